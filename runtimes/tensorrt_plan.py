"""The native TensorRT backend's pure parts, testable without TensorRT: optimisation-profile ranges from the
spec, the graph's precision and the builder flags it implies, and the engine cache key.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from wmdeploy.contract import BATCH, StreamingSpec
from wmdeploy.errors import BackendError

from .ort_tensorrt import _range

Shape = tuple[int, ...]
_LOW_PRECISION = {10, 16}  # onnx.TensorProto.FLOAT16, BFLOAT16
_QDQ = {"QuantizeLinear", "DequantizeLinear"}


def profile_ranges(spec: StreamingSpec, batch: Sequence[int] = (1, 1, 64),
                   axes: Mapping[str, Sequence[int]] | None = None) -> dict[str, tuple[Shape, Shape, Shape]]:
    """``name -> (min, opt, max)`` shapes for every data input and state: the EP's profile, as tuples."""
    ranges = {BATCH: _range(BATCH, batch)}
    for name, value in {"time": (1, 1, 64), **(axes or {})}.items():
        ranges[name] = _range(name, value)
    out: dict[str, tuple[Shape, Shape, Shape]] = {}
    for name, shape in [(t.name, t.shape) for t in spec.inputs] + [(s.name, s.shape) for s in spec.states]:
        missing = [d for d in shape if isinstance(d, str) and d not in ranges]
        if missing:
            raise BackendError(f"tensorrt profile: input '{name}' has axis '{missing[0]}' with no range; pass axes={{'{missing[0]}': (min, opt, max)}}")
        min_, opt, max_ = (tuple(ranges[d][k] if isinstance(d, str) else int(d) for d in shape) for k in range(3))
        out[name] = (min_, opt, max_)
    return out


def graph_precision_of(op_types: Iterable[str], elem_types: Iterable[int]) -> str:
    """``"qdq"`` (explicit quantization), ``"fp16"`` (float16/bfloat16 tensors) or ``"fp32"``."""
    if _QDQ & set(op_types):
        return "qdq"
    return "fp16" if _LOW_PRECISION & set(elem_types) else "fp32"


def graph_precision(path: str | Path) -> str:
    """The precision the ONNX file itself carries; ``"unknown"`` where ``onnx`` is not installed."""
    try:
        import onnx  # noqa: PLC0415  (optional on the edge)
    except ImportError:
        return "unknown"
    model = onnx.load(str(path), load_external_data=False)
    ops: set[str] = set()
    types: set[int] = set()
    graphs = [model.graph]
    while graphs:  # subgraphs of Loop/If/Scan count too
        g = graphs.pop()
        types |= {t.data_type for t in g.initializer}
        types |= {v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
        for node in g.node:
            ops.add(node.op_type)
            for a in node.attribute:
                if node.op_type == "Cast" and a.name == "to":
                    types.add(a.i)
                graphs += [a.g] if a.HasField("g") else []
                graphs += list(a.graphs)
    return graph_precision_of(ops, types)


@dataclass(frozen=True)
class PrecisionPlan:
    strongly_typed: bool  # NetworkDefinitionCreationFlag.STRONGLY_TYPED (always on, and implicit, on TRT 11)
    fp16_flag: bool  # BuilderFlag.FP16 (TRT 10 only)
    why: str


def precision_plan(trt_major: int, fp16: bool, graph: str) -> PrecisionPlan:
    """How to build for ``fp16`` on TensorRT ``trt_major`` given the graph's own precision (see module doc)."""
    if trt_major < 10:
        raise BackendError(f"tensorrt {trt_major}.x: this backend needs TensorRT 10 or later")
    if graph in ("fp16", "qdq"):
        return PrecisionPlan(True, False, f"strongly typed: precision from the graph ({graph})")
    if trt_major >= 11:
        if fp16 and graph == "fp32":
            raise BackendError("tensorrt 11 has no FP16 builder flag; precision comes from the graph: convert it "
                               "first (wmdeploy quantize --mode fp16) and load that file")
        return PrecisionPlan(True, False, f"strongly typed (TensorRT 11): precision from the graph ({graph})")
    if fp16:  # TRT 10, fp32 graph: weak typing is what lets the builder pick fp16 kernels
        return PrecisionPlan(False, True, "weakly typed with BuilderFlag.FP16 (TensorRT 10)")
    return PrecisionPlan(True, False, f"strongly typed: precision from the graph ({graph})")


def cache_key(model_sha256: str, gpu: str, compute_capability: tuple[int, int], trt_version: str,
              build: Mapping[str, Any] | None = None) -> str:
    """A stable key for an engine plan: model bytes, GPU, TensorRT version and build options."""
    doc = json.dumps({"model": model_sha256, "gpu": gpu, "cc": list(compute_capability), "trt": trt_version,
                      "build": build or {}}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:24]
