"""What a profile run produces: the per-file facts, the cells (one per file x backend x batch x chunk) and
the report that renders them as a table, JSON, CSV or a plot. Kept apart from what produces it (the
local run in ``runner``, the server run in ``server``) so both build the same report without importing
each other.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import machine as _machine
from .timing import Timing, latency_stats
from ..contract import StreamingSpec, read_spec
from ..errors import InputError
from ..runners import time_axis_name

FORMAT = "wmdeploy.profile"
VERSION = 1

Progress = Callable[[int, int, str], None]  # (cells done, cells in all, what is running now)


@dataclass
class ModelFacts:
    """What a file weighs and carries, for every cell of it."""

    file: str
    label: str
    spec: StreamingSpec = field(repr=False)
    weight_bytes: int
    weight_bytes_source: str
    has_time_axis: bool

    @property
    def state_bytes_per_stream(self) -> int:
        return self.spec.state_bytes_per_stream

    @property
    def floor_state_bytes_per_stream(self) -> int:
        """State bytes a step surely reads and writes whole: the ping-pong states. An in-place KV cache (under
        GroupQueryAttention) is read up to the position and written one row a step, so what it costs depends on
        the context; the floor leaves it out and stays a lower bound."""
        return sum(s.bytes_per_stream for s in self.spec.states if not s.inplace)

    @property
    def language_model(self) -> bool:
        """Token ids in (an input indexing a table): items are tokens, chunk 1 is decode, longer is prefill."""
        return any(t.index_bound is not None for t in self.spec.inputs)

    def floor_bytes(self, batch: int, weight_divisor: int = 1) -> int:
        """What a step of ``batch`` streams must at least move: the weights once, each ping-pong state in and out."""
        return self.weight_bytes // weight_divisor + 2 * batch * self.floor_state_bytes_per_stream

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "label": self.label, "weight_bytes": self.weight_bytes,
                "weight_bytes_source": self.weight_bytes_source,
                "state_bytes_per_stream": self.state_bytes_per_stream,
                "states": [{**s.to_dict(), "bytes_per_stream": s.bytes_per_stream} for s in self.spec.states]}


@dataclass
class Cell:
    """One (file, backend, batch, chunk) measurement."""

    model: ModelFacts
    backend: str  # as asked ("auto" too)
    backend_used: str  # what ran
    backend_info: dict[str, Any]
    device: str
    mode: str
    batch: int
    chunk: int
    timing: Timing | None = None
    peak_rss_bytes: int | None = None
    device_memory_bytes: int | None = None
    floor_s: float | None = None
    speedup: float | None = None  # baseline p50 / this p50 (the first file and backend at this batch/chunk)
    state_changed: bool | None = None
    fits_in_cache: bool | None = None  # weights + state within the CPU's last-level cache: the DRAM floor is moot
    error: str | None = None
    final_state: dict[str, np.ndarray] | None = field(default=None, repr=False)  # not exported

    @property
    def ok(self) -> bool:
        return self.timing is not None and self.error is None

    @property
    def stats(self) -> dict[str, float]:
        return latency_stats(self.timing.samples_s) if self.timing else {}

    @property
    def items_per_step(self) -> int:
        """Items (batch x time positions) per timed step; a server step is one session's request."""
        return self.chunk if self.mode == "server" else self.batch * self.chunk

    @property
    def label(self) -> str:
        if self.mode == "server":
            return f"{self.model.label} [server]"
        return self.model.label if self.backend == "auto" else f"{self.model.label} [{self.backend_used}]"

    def row(self) -> dict[str, Any]:
        """Every scalar of the cell, flat (a CSV row; the JSON cell adds the per-window medians)."""
        r: dict[str, Any] = {
            "file": self.model.file, "label": self.label, "backend": self.backend_used, "device": self.device,
            "mode": self.mode, "batch": self.batch, "chunk": self.chunk, "items_per_step": self.items_per_step,
        }
        st = self.stats
        for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "min_ms", "mean_ms"):
            r[k] = st.get(k)
        t = self.timing
        r["steps_per_s"] = t.steps_per_s if t else None
        r["items_per_s"] = t.steps_per_s * self.items_per_step if t else None
        r["samples"] = len(t.samples_s) if t else 0
        r["windows"] = len(t.windows) if t else 0
        r["settled"] = t.settled if t else None
        r["stability"] = t.stability if t else None
        r["warmup"] = t.warmup if t else None
        r["steps_carried"] = t.steps if t else 0
        r["state_changed"] = self.state_changed
        r["speedup"] = self.speedup
        r["floor_ms"] = None if self.floor_s is None else self.floor_s * 1e3
        r["floor_fraction"] = (self.floor_s / (st["p50_ms"] / 1e3)) if (self.floor_s and st) else None
        r["fits_in_cache"] = self.fits_in_cache
        r["weight_bytes"] = self.model.weight_bytes
        r["state_bytes_per_stream"] = self.model.state_bytes_per_stream
        r["state_bytes"] = self.model.state_bytes_per_stream * self.batch
        r["peak_rss_bytes"] = self.peak_rss_bytes
        r["device_memory_bytes"] = self.device_memory_bytes
        r["error"] = self.error
        return r


@dataclass
class ProfileReport:
    machine: dict[str, Any]
    bandwidth: _machine.Bandwidth
    launch_floor_s: float | None
    launch_floor_method: str | None
    settings: dict[str, Any]
    models: list[ModelFacts]
    cells: list[Cell]
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Flat rows, sorted for reading: by chunk, then batch, then files and backends in the order given."""
        return [c.row() for c in self.sorted_cells()]

    def sorted_cells(self) -> list[Cell]:
        order = {id(c): i for i, c in enumerate(self.cells)}
        return sorted(self.cells, key=lambda c: (c.chunk, c.batch, order[id(c)]))

    @property
    def baseline(self) -> str | None:
        return self.cells[0].label if self.cells else None

    def to_dict(self) -> dict[str, Any]:
        cells = []
        for c in self.sorted_cells():
            d = c.row()
            if c.timing is not None:
                d["window_p50_ms"] = [w.p50_s * 1e3 for w in c.timing.windows]
                d["samples_ms"] = [s * 1e3 for s in c.timing.samples_s]
            d["backend_info"] = c.backend_info
            cells.append(d)
        return {
            "format": FORMAT, "version": VERSION, "created": self.created, "machine": self.machine,
            "bandwidth": self.bandwidth.to_dict(),
            "launch_floor_ms": None if self.launch_floor_s is None else self.launch_floor_s * 1e3,
            "launch_floor_method": self.launch_floor_method, "settings": self.settings,
            "baseline": self.baseline, "models": [m.to_dict() for m in self.models], "cells": cells,
        }

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def write_csv(self, path: str | Path) -> None:
        """One row per cell, every scalar, with the machine repeated on each row so a row stands alone."""
        m = self.machine
        extra = {"cpu_model": m.get("cpu_model"), "usable_cores": m.get("usable_cores"),
                 "last_level_cache_bytes": m.get("last_level_cache_bytes"),
                 "onnxruntime": m.get("onnxruntime"), "providers": " ".join(m.get("onnxruntime_providers") or []),
                 "gpu": "; ".join(g["name"] for g in m.get("gpus") or []),
                 "bandwidth_gb_per_s": self.bandwidth.gb_per_s, "created": self.created}
        rows = [{**r, **extra} for r in self.rows]
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["file"])
            writer.writeheader()
            writer.writerows(rows)

    def table(self, width: int | None = None) -> Any:
        """Rich renderables; below ``width`` columns the least telling columns are left out."""
        from .table import render  # noqa: PLC0415  (rich only when drawn)

        return render(self, width)

    def plot(self, path: str | Path) -> Path:
        """The PNG: latency and throughput against batch (needs matplotlib, the ``plot`` extra)."""
        from .plot import plot  # noqa: PLC0415

        return plot(self, path)


def model_facts(files: Sequence[str | Path]) -> list[ModelFacts]:
    """Read every file's spec and weight bytes before measuring anything, so bad input fails at once."""
    facts: list[ModelFacts] = []
    stems = [Path(f).stem for f in files]
    for f, stem in zip(files, stems):
        spec = read_spec(f)  # ModelFileError: missing file, not ONNX, no spec
        try:
            from ..inspect import inspect_model  # noqa: PLC0415

            weights = inspect_model(f)["weight_bytes"]
            source = "onnx initializers"
        except ImportError:
            weights = None
        if weights is None:  # the edge install has no onnx: the file is (almost all) weights
            weights, source = Path(f).stat().st_size, "file size (onnx not installed)"
        label = stem if stems.count(stem) == 1 else str(f)
        has_time = any(time_axis_name(spec) in t.shape for t in spec.inputs)
        facts.append(ModelFacts(str(f), label, spec, int(weights), source, has_time))
    return facts


def speedups(cells: list[Cell]) -> None:
    """Each cell's speed against the first (file, backend) at the same batch and chunk."""
    first: dict[tuple[int, int], Cell] = {}
    for c in cells:
        first.setdefault((c.batch, c.chunk), c)
    for c in cells:
        base = first[(c.batch, c.chunk)]
        if c.ok and base.ok:
            c.speedup = base.stats["p50_ms"] / c.stats["p50_ms"]


def parse_ints(text: str, flag: str) -> list[int]:
    """``"1,8,64"`` -> ``[1, 8, 64]``; anything else is a one-line error naming ``flag``."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise InputError(f"{flag}: expected comma-separated positive integers such as 1,8,64, got {text!r}")
    return list(dict.fromkeys(values))


def positive_ints(values: Sequence[int], flag: str) -> list[int]:
    out = [int(v) for v in values]
    if not out or any(v <= 0 for v in out):
        raise InputError(f"{flag}: expected comma-separated positive integers such as 1,8,64, got {list(values)}")
    return list(dict.fromkeys(out))


def load_report(path: str | Path) -> dict[str, Any]:
    """A report written by :meth:`ProfileReport.write_json`, as a dict (for plotting it again later)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable profile JSON ({exc})") from None
    if data.get("format") != FORMAT:
        raise InputError(f"{path}: field 'format' is {data.get('format')!r}; expected '{FORMAT}'")
    return data
