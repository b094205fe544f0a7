"""``wmdeploy profile``: per-step latency and throughput of streaming models on this machine, side by side
across files, backends, batch sizes and chunk lengths, against the memory-bound floor.

What is measured is what an application gets: a model loaded through :func:`wmdeploy.load`, a ``Stream``
of ``batch`` sequences (or a ``StreamPool`` of ``batch`` streams with ``mode="pool"``, as the server runs
them) stepped with fresh random chunks while the backend carries the state in its arena, input checks
included. Each (file, backend, batch, chunk) is a *cell*: warm-up steps, then timed windows until the
median settles (see :mod:`wmdeploy._timing`).

The floor: a step must at least read the weights once and read and write the state of its ``batch``
streams once, so ``floor = (weight bytes + 2 x batch x state bytes per stream) / bandwidth``, with the
bandwidth measured once per run by a large copy (:mod:`wmdeploy._machine`); on a GPU the floor is at
least one kernel launch. ``floor_fraction = floor / p50``: 1.0 is the memory-bound limit; a batch-1 step
far below it is paying overheads, a large batch far below it has become compute-bound (as it should).

Torch-free: numpy, onnxruntime and (for weight bytes) onnx when present.
"""
from __future__ import annotations

import csv
import datetime as _dt
import gc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import _machine
from ._timing import Timing, latency_stats, measure
from .contract import StreamingSpec, read_spec
from .errors import InputError, WmdeployError
from .verify import axis_sizes, sample_inputs, time_axis_name

FORMAT = "wmdeploy.profile"
VERSION = 1
MODES = ("stream", "pool")
_INPUT_VARIANTS = 8  # distinct random chunks cycled through, so no step repeats its predecessor's input

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
        from ._profile_table import render  # noqa: PLC0415  (rich only when drawn)

        return render(self, width)

    def plot(self, path: str | Path) -> Path:
        """The PNG: latency and throughput against batch (needs matplotlib, the ``plot`` extra)."""
        from ._plot import plot  # noqa: PLC0415

        return plot(self, path)


# ---- running ----------------------------------------------------------------------------------------

def _facts(files: Sequence[str | Path]) -> list[ModelFacts]:
    """Read every file's spec and weight bytes before measuring anything, so bad input fails at once."""
    facts: list[ModelFacts] = []
    stems = [Path(f).stem for f in files]
    for f, stem in zip(files, stems):
        spec = read_spec(f)  # ModelFileError: missing file, not ONNX, no spec
        try:
            from .inspect import inspect_model  # noqa: PLC0415

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


def _inputs(spec: StreamingSpec, batch: int, chunk: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    sizes = axis_sizes(spec, batch, chunk)
    return [sample_inputs(spec, sizes, rng) for _ in range(_INPUT_VARIANTS)]


def _rows_of(spec: StreamingSpec, feeds: dict[str, np.ndarray], batch: int) -> list[dict[str, np.ndarray]]:
    """Split batched inputs into ``batch`` one-stream inputs (batch axis of size 1), for a pool."""
    return [{t.name: np.ascontiguousarray(np.take(feeds[t.name], [i], axis=t.batch_axis)) for t in spec.inputs}
            for i in range(batch)]


def _run_cell(model: Any, cell: Cell, settings: dict[str, Any], on_window: Callable[[int, float], None]) -> None:
    spec = model.spec
    variants = _inputs(spec, cell.batch, cell.chunk, seed=cell.batch * 1000 + cell.chunk)
    counter = iter(range(1 << 62))
    if cell.mode == "stream":
        stream = model.stream(batch=cell.batch)

        def step() -> Any:
            return stream.step(**variants[next(counter) % _INPUT_VARIANTS])

        def final() -> dict[str, np.ndarray]:
            return dict(stream.state)
    else:
        pool = model.pool(cell.batch)
        sids = [pool.join() for _ in range(cell.batch)]
        requests = [dict(zip(sids, _rows_of(spec, v, cell.batch))) for v in variants]

        def step() -> Any:
            return pool.step(requests[next(counter) % _INPUT_VARIANTS])

        def final() -> dict[str, np.ndarray]:
            per = [pool.state(sid) for sid in sids]
            return {s.name: np.concatenate([p[s.name] for p in per], axis=s.batch_axis) for s in spec.states}

    gc.collect()
    rss = _machine.PeakRss()
    rss.reset()
    cell.timing = measure(step, warmup=settings["warmup"], window_steps=settings["steps"],
                          window_seconds=settings["seconds"], stability=settings["stability"],
                          max_windows=settings["max_windows"], on_window=on_window)
    cell.peak_rss_bytes = rss.peak()
    if cell.device != "cpu":
        cell.device_memory_bytes = _machine.gpu_memory_used()
    # Read back after timing: proof that the state moved (a stateless repeat would leave it initial).
    cell.final_state = final()
    initial = spec.initial_states(cell.batch)
    cell.state_changed = any(not np.array_equal(cell.final_state[s.name], initial[s.name]) for s in spec.states)


def parse_ints(text: str, flag: str) -> list[int]:
    """``"1,8,64"`` -> ``[1, 8, 64]``; anything else is a one-line error naming ``flag``."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise InputError(f"{flag}: expected comma-separated positive integers such as 1,8,64, got {text!r}")
    return list(dict.fromkeys(values))


def _positive_ints(values: Sequence[int], flag: str) -> list[int]:
    out = [int(v) for v in values]
    if not out or any(v <= 0 for v in out):
        raise InputError(f"{flag}: expected comma-separated positive integers such as 1,8,64, got {list(values)}")
    return list(dict.fromkeys(out))


def profile(files: Sequence[str | Path], backends: Sequence[str] = ("auto",), device: str = "cpu",
            batches: Sequence[int] = (1,), chunks: Sequence[int] = (1,), steps: int | None = None,
            seconds: float = 0.5, warmup: int = 10, threads: int | None = None, mode: str = "stream",
            stability: float = 0.10, max_windows: int = 10, bandwidth: _machine.Bandwidth | None = None,
            progress: Progress | None = None, backend_options: dict[str, Any] | None = None) -> ProfileReport:
    """Profile every (file, backend, batch, chunk) cell; see the module docstring for what is measured.

    ``steps`` fixes the timed steps per window; otherwise each window runs for ``seconds``. Windows
    repeat until the last three medians agree within ``stability`` (0.10 = 10 %) or ``max_windows``.
    ``bandwidth`` skips the bandwidth measurement (for repeated runs in one process).
    ``backend_options`` go to every ``wmdeploy.load`` (e.g. ``{"cuda_graph": True}``).
    """
    from .runtimes import select  # noqa: PLC0415

    if not files:
        raise InputError("MODEL: expected at least one ONNX file")
    batches, chunks = _positive_ints(batches, "--batch"), _positive_ints(chunks, "--chunk")
    backends = list(dict.fromkeys(backends)) or ["auto"]
    if mode not in MODES:
        raise InputError(f"--mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if steps is not None and steps < 1:
        raise InputError(f"--steps: expected a positive integer, got {steps}")
    if seconds <= 0:
        raise InputError(f"--seconds: expected a positive number of seconds, got {seconds}")
    if warmup < 0:
        raise InputError(f"--warmup: expected 0 or more steps, got {warmup}")
    if threads is not None and threads < 1:
        raise InputError(f"--threads: expected a positive integer, got {threads}")
    if not 0 < stability < 10 or max_windows < 1:
        raise InputError(f"--stability/--max-windows: expected 0 < stability and at least 1 window, "
                         f"got {stability} and {max_windows}")
    for b in backends:
        select(b, device)  # BackendError (one line) for an unknown or unavailable backend, before any work
    models = _facts(files)
    settings = {"backends": backends, "device": device, "batches": batches, "chunks": chunks, "steps": steps,
                "seconds": seconds, "warmup": warmup, "threads": threads, "mode": mode, "stability": stability,
                "max_windows": max_windows, "backend_options": dict(backend_options or {})}
    bw = bandwidth or _machine.measure_bandwidth(device)
    launch_s, launch_how = _machine.gpu_launch_floor() if device != "cpu" else (None, None)

    llc = _machine.last_level_cache()
    total = len(models) * len(backends) * len(batches) * len(chunks)
    cells: list[Cell] = []
    from .streaming import load  # noqa: PLC0415

    for facts in models:
        for backend in backends:
            model = load(facts.file, backend=backend, device=device, spec=facts.spec, threads=threads,
                         **(backend_options or {}))
            try:
                for chunk in chunks:
                    for batch in batches:
                        cell = Cell(facts, backend, model.backend_name, model.describe(), device, mode, batch, chunk)
                        cells.append(cell)
                        what = f"{cell.label} batch {batch} chunk {chunk}"
                        max_chunk = int(facts.spec.meta.get("max_chunk", 0) or 0)
                        if chunk > 1 and not facts.has_time_axis:
                            cell.error = f"chunk {chunk}: the model's inputs have no '{time_axis_name(facts.spec)}' axis"
                        elif max_chunk and chunk > max_chunk:
                            cell.error = f"chunk {chunk}: longer than the model's max_chunk {max_chunk}"
                        else:
                            def on_window(i: int, p50: float, what: str = what) -> None:
                                if progress:
                                    progress(len(cells) - 1, total, f"{what}: window {i}, p50 {p50 * 1e3:.3g} ms")

                            if progress:
                                progress(len(cells) - 1, total, f"{what}: warm-up")
                            try:
                                _run_cell(model, cell, settings, on_window)
                            except WmdeployError as exc:  # e.g. a batch the engine cannot allocate
                                cell.error = " ".join(str(exc).split())
                            byts = facts.weight_bytes + 2 * batch * facts.state_bytes_per_stream
                            cell.floor_s = byts / bw.bytes_per_s if bw.bytes_per_s else None
                            if device == "cpu" and llc:
                                cell.fits_in_cache = byts <= llc
                            if launch_s is not None:
                                cell.floor_s = max(cell.floor_s or 0.0, launch_s)
                        if progress:
                            progress(len(cells), total, what)
            finally:
                model.close()
    _speedups(cells)
    return ProfileReport(_machine.machine_info(device), bw, launch_s, launch_how, settings, models, cells)


def _speedups(cells: list[Cell]) -> None:
    """Each cell's speed against the first (file, backend) at the same batch and chunk."""
    first: dict[tuple[int, int], Cell] = {}
    for c in cells:
        first.setdefault((c.batch, c.chunk), c)
    for c in cells:
        base = first[(c.batch, c.chunk)]
        if c.ok and base.ok:
            c.speedup = base.stats["p50_ms"] / c.stats["p50_ms"]


def check_plot_available() -> None:
    """Raise the one-line ``--plot`` error now when matplotlib is missing (before a long run)."""
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError:
        raise InputError("--plot: needs matplotlib; install it with pip install 'wmdeploy[plot]'") from None


def profile_server(url: str, files: Sequence[str | Path], concurrency: Sequence[int] = (1, 8, 64),
                   chunks: Sequence[int] = (1,), steps: int | None = None, seconds: float = 0.5, warmup: int = 5,
                   stability: float = 0.10, max_windows: int = 10, api_key: str | None = None,
                   bandwidth: _machine.Bandwidth | None = None, progress: Progress | None = None) -> ProfileReport:
    """Profile a running ``wmdeploy serve`` at ``url``: ``concurrency`` sessions each streaming.

    ``files`` is the model the server serves (its spec makes valid chunks). One cell per (concurrency,
    chunk); see :mod:`wmdeploy._profile_server`.
    """
    from ._profile_server import profile_server as run  # noqa: PLC0415

    return run(url, files, concurrency, chunks, steps=steps, seconds=seconds, warmup=warmup, stability=stability,
               max_windows=max_windows, api_key=api_key, bandwidth=bandwidth, progress=progress)


def load_report(path: str | Path) -> dict[str, Any]:
    """A report written by :meth:`ProfileReport.write_json`, as a dict (for plotting it again later)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable profile JSON ({exc})") from None
    if data.get("format") != FORMAT:
        raise InputError(f"{path}: field 'format' is {data.get('format')!r}; expected '{FORMAT}'")
    return data
