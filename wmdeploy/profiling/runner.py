"""``wmdeploy profile``: per-step latency and throughput of streaming models on this machine, side by side
across files, backends, batch sizes and chunk lengths, against the memory-bound floor.

What is measured is what an application gets: a model loaded through :func:`wmdeploy.load`, a ``Stream``
of ``batch`` sequences (or a ``StreamPool`` of ``batch`` streams with ``mode="pool"``, as the server runs
them) stepped with fresh random chunks while the backend carries the state in its arena, input checks
included. Each (file, backend, batch, chunk) is a *cell*: warm-up steps, then timed windows until the
median settles (see :mod:`wmdeploy.profiling.timing`).

The floor: a step must at least read the weights once and read and write the state of its ``batch``
streams once, so ``floor = (weight bytes + 2 x batch x state bytes per stream) / bandwidth`` (in-place KV
caches left out: a step reads them up to its position only, see ``ModelFacts.floor_bytes``), with the
bandwidth measured once per run by a large copy (:mod:`wmdeploy.profiling.machine`); on a GPU the floor is at
least one kernel launch. ``floor_fraction = floor / p50``: 1.0 is the memory-bound limit; a batch-1 step
far below it is paying overheads, a large batch far below it has become compute-bound (as it should).

Torch-free: numpy, onnxruntime and (for weight bytes) onnx when present.
"""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import machine as _machine
from .report import Cell, ProfileReport, Progress, model_facts, positive_ints, speedups
from .timing import measure
from .._inputs import ContextBound
from ..contract import StreamingSpec
from ..errors import InputError, WmdeployError
from ..runners import axis_sizes, sample_inputs, time_axis_name

MODES = ("stream", "pool")
_INPUT_VARIANTS = 8  # distinct random chunks cycled through, so no step repeats its predecessor's input

# ---- running ----------------------------------------------------------------------------------------

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
    # a language model with a context capacity (export hf:): a stream that would pass it starts again (its
    # reset is inside that one timed step), so any number of windows fits; decode stays at real contexts
    bound = ContextBound.of(spec)
    capacity = bound.capacity if bound is not None else None
    if capacity is not None and cell.chunk > capacity:
        raise InputError(f"--chunk {cell.chunk}: longer than the file's context capacity of {capacity} tokens")
    if cell.mode == "stream":
        stream = model.stream(batch=cell.batch)

        def step() -> Any:
            if capacity is not None and stream.position + cell.chunk > capacity:
                stream.reset()
            return stream.step(**variants[next(counter) % _INPUT_VARIANTS])

        def final() -> dict[str, np.ndarray]:
            return dict(stream.state)
    else:
        pool = model.pool(cell.batch)
        sids = [pool.join() for _ in range(cell.batch)]
        requests = [dict(zip(sids, _rows_of(spec, v, cell.batch))) for v in variants]

        def step() -> Any:
            if capacity is not None and pool.position(sids[0]) + cell.chunk > capacity:
                for sid in sids:  # every stream moved in step: they reach the capacity together
                    pool.reset(sid)
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
    from ..runtimes import select  # noqa: PLC0415

    if not files:
        raise InputError("MODEL: expected at least one ONNX file")
    batches, chunks = positive_ints(batches, "--batch"), positive_ints(chunks, "--chunk")
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
        select(split_backend(b)[0], device)  # BackendError (one line) for an unknown or unavailable backend, before any work
    models = model_facts(files)
    settings = {"backends": backends, "device": device, "batches": batches, "chunks": chunks, "steps": steps,
                "seconds": seconds, "warmup": warmup, "threads": threads, "mode": mode, "stability": stability,
                "max_windows": max_windows, "backend_options": dict(backend_options or {})}
    bw = bandwidth or _machine.measure_bandwidth(device)
    launch_s, launch_how = _machine.gpu_launch_floor() if device != "cpu" else (None, None)

    llc = _machine.last_level_cache()
    total = len(models) * len(backends) * len(batches) * len(chunks)
    cells: list[Cell] = []
    from ..streaming import load  # noqa: PLC0415

    for facts in models:
        for backend in backends:
            name, precision = split_backend(backend)
            model = load(facts.file, backend=name, device=device, spec=facts.spec, threads=threads,
                         **precision, **(backend_options or {}))
            # bf16/f16 matmul weights are half the file's float32 bytes (the floor must say so)
            effective = model.describe().get("effective_precision")
            halved = effective in ("bf16", "f16")
            used = f"{model.backend_name}:{effective}" if effective else model.backend_name  # what ran, precision too
            try:
                for chunk in chunks:
                    for batch in batches:
                        cell = Cell(facts, backend, used, model.describe(), device, mode, batch, chunk)
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
                            byts = facts.floor_bytes(batch, 2 if halved else 1)
                            cell.floor_s = byts / bw.bytes_per_s if bw.bytes_per_s else None
                            if device == "cpu" and llc:
                                cell.fits_in_cache = byts <= llc
                            if launch_s is not None:
                                cell.floor_s = max(cell.floor_s or 0.0, launch_s)
                        if progress:
                            progress(len(cells), total, what)
            finally:
                model.close()
    speedups(cells)
    return ProfileReport(_machine.machine_info(device), bw, launch_s, launch_how, settings, models, cells)


def split_backend(backend: str) -> tuple[str, dict[str, str]]:
    """``"openvino:bf16"`` -> ``("openvino", {"precision": "bf16"})``: one backend at one precision per column."""
    name, _, precision = backend.partition(":")
    return name, ({"precision": precision} if precision else {})


def check_plot_available() -> None:
    """Raise the one-line ``--plot`` error now when matplotlib is missing (before a long run)."""
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError:
        raise InputError("--plot: needs matplotlib; install it with pip install 'wmdeploy[plot]'") from None
