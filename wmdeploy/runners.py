"""Runners and the inputs they are fed: the pieces that verify, calibration, drift, profile and export share.

Polygraphy's shape: a *runner* executes one step (``step(inputs, states) -> (outputs, next_states)``):
an ONNX file on ONNX Runtime, or a PyTorch module (through ``torch_module``, imported lazily: this module
is torch-free). ``sample_inputs``/``axis_sizes`` make the random chunks every check and benchmark feeds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from .contract import BATCH, StreamingSpec, read_spec
from .errors import BackendError, ModelFileError

Arrays = dict[str, np.ndarray]


# ---- inputs -------------------------------------------------------------------------------------

def time_axis_name(spec: StreamingSpec) -> str:
    return str(spec.meta.get("time_axis", "time"))


def axis_sizes(spec: StreamingSpec, batch: int, time: int, other: int = 5) -> dict[str, int]:
    """Concrete sizes for every named axis: ``batch``, the time axis, any other name."""
    sizes: dict[str, int] = {BATCH: batch}
    for t in (*spec.inputs, *spec.outputs):
        for d in t.shape:
            if isinstance(d, str) and d not in sizes:
                sizes[d] = time if d == time_axis_name(spec) else other
    return sizes


def sample_inputs(spec: StreamingSpec, sizes: dict[str, int], rng: np.random.Generator) -> Arrays:
    """Random data inputs: tokens in ``[0, meta.vocab_size)``, floats standard normal, bools fair coins."""
    out: Arrays = {}
    for t in spec.inputs:
        shape = t.concrete_shape(sizes)
        kind = t.np_dtype.kind
        if kind == "f":
            out[t.name] = rng.standard_normal(shape).astype(t.np_dtype)
        elif kind == "b":
            out[t.name] = rng.random(shape) < 0.5
        else:
            # below the input's own bound (an inferred embedding size) and the declared vocabulary
            bounds = [b for b in (t.index_bound, spec.meta.get("vocab_size")) if isinstance(b, int) and b > 0]
            high = min(bounds) if bounds else 2
            out[t.name] = rng.integers(0, high, size=shape).astype(t.np_dtype)
    return out


def chunk_schedule(spec: StreamingSpec, chunks: Sequence[int], steps: int | None) -> list[int]:
    """Chunk lengths per call, cycled to ``steps`` calls, clipped to the model's ``max_chunk``."""
    max_chunk = int(spec.meta.get("max_chunk", 0)) or None
    lengths = [min(c, max_chunk) if max_chunk else c for c in chunks]
    n = steps if steps is not None else 2 * len(lengths)
    return [lengths[i % len(lengths)] for i in range(n)]


# ---- runners ------------------------------------------------------------------------------------

class Runner(Protocol):
    name: str

    def step(self, inputs: Arrays, states: Arrays) -> tuple[Arrays, Arrays]: ...


class OnnxRunner:
    """One ONNX file on ONNX Runtime (CPU unless ``providers`` says otherwise)."""

    def __init__(self, path: str | Path, spec: StreamingSpec | None = None, providers: Sequence[str] | None = None):
        import onnxruntime as ort  # noqa: PLC0415

        self.name = str(path)
        self.spec = spec or read_spec(path)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # onnxruntime raises its own pybind types (InvalidGraph, Fail, ...)
            raise ModelFileError(f"{path}: ONNX Runtime cannot load it ({type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())})") from None
        self._consts = {c.name: c.array() for c in self.spec.constants}
        self._out_names = self.spec.graph_output_names

    def step(self, inputs: Arrays, states: Arrays) -> tuple[Arrays, Arrays]:
        feed = {**inputs, **self._consts, **states}
        try:
            values = self.session.run(self._out_names, feed)
        except Exception as exc:  # onnxruntime raises its own pybind types
            raise BackendError(f"{self.name}: ONNX Runtime failed: {' '.join(str(exc).split())}") from None
        n = len(self.spec.outputs)
        outs = {t.name: v for t, v in zip(self.spec.outputs, values[:n])}
        nxt = {s.name: v for s, v in zip(self.spec.states, values[n:])}
        return outs, nxt


class TorchRunner:
    """A PyTorch module under the streaming contract (its returned shapes checked against the spec)."""

    def __init__(self, module: Any, spec: StreamingSpec | None = None):
        from .torch_module import module_spec  # noqa: PLC0415  (torch only when a module is compared)

        self.module = module.eval()
        self.name = f"torch:{type(module).__name__}"
        self.spec = spec or module_spec(module)

    def step(self, inputs: Arrays, states: Arrays) -> tuple[Arrays, Arrays]:
        from .torch_module import run_module  # noqa: PLC0415

        return run_module(self.module, self.spec, inputs, states)


def as_runner(obj: Any, spec: StreamingSpec | None = None) -> Runner:
    if isinstance(obj, (str, Path)):
        return OnnxRunner(obj, spec)
    if hasattr(obj, "step") and hasattr(obj, "name"):
        return obj
    return TorchRunner(obj, spec)
