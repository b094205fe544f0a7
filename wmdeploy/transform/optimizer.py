"""``wmdeploy optimize``: graph simplification and constant folding, saved so that it stays portable.

Two stages, each optional:

1. onnxslim: constant folding, dead-node and shape-arithmetic elimination, standard-ONNX output only
   (safe for every provider and engine).
2. ONNX Runtime's offline graph optimizations, saved with ``optimized_model_filepath``. Which level is
   safe for which target:

   ============  =================================================================================
   ``basic``     standard ONNX ops only (constant folding, redundant node elimination): portable to
                 every provider -- ORT CPU, CUDA, TensorRT EP -- and to native TensorRT. Default.
   ``extended``  adds fusions into ``com.microsoft`` contrib ops (FusedMatMul, SkipLayerNorm, ...):
                 ORT CPU and CUDA only; TensorRT (EP or native) does not parse contrib ops.
   ``all``       adds layout transforms for the CPU that made the file (NCHWc, ...); a file saved at
                 this level is tied to that machine. Refused here: ORT applies it at session creation.
   ============  =================================================================================

The output is verified against the input (same random streams, each carrying its own state) before
it is kept, because a simplified graph must compute the same function.
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFileError, VerificationError
from .lineage import load_transform_source, make_record, save_checked

LEVELS = {"none": None, "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED"}
PORTABILITY = {
    "none": "every provider and engine (onnxslim output is standard ONNX)",
    "basic": "every provider and engine: ORT CPU, CUDA, TensorRT EP, native TensorRT",
    "extended": "ONNX Runtime CPU and CUDA only (contrib fused ops; not TensorRT)",
}


def graph_stats(model: Any) -> dict[str, Any]:
    """Node count (main graph), op histogram and weight bytes (initializers and Constant tensors)."""
    import onnx  # noqa: PLC0415

    # Constant nodes count too: folding turns them into initializers, which must not look like growth
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node if n.op_type == "Constant"
                                               for a in n.attribute if a.name == "value"]
    weight_bytes = 0
    for init in tensors:
        n = int(np.prod(init.dims)) if len(init.dims) else 1
        weight_bytes += n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    ops = Counter((f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in model.graph.node)
    return {"nodes": len(model.graph.node), "weight_bytes": weight_bytes, "op_types": dict(ops.most_common())}


@dataclass
class OptimizeReport:
    source: str
    output: str
    level: str
    portable_to: str
    stages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (stage name, graph_stats)
    verify_summary: str = ""

    @property
    def before(self) -> dict[str, Any]:
        return self.stages[0][1]

    @property
    def after(self) -> dict[str, Any]:
        return self.stages[-1][1]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "output": self.output, "level": self.level, "portable_to": self.portable_to,
                "stages": [{"stage": s, **st} for s, st in self.stages], "verify": self.verify_summary}

    def table(self) -> Any:
        from rich.markup import escape  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415

        table = Table(title=escape(f"optimize {self.source} -> {self.output} (level {self.level}: {self.portable_to})"))
        for col in ("stage", "nodes", "weight bytes", "top op types"):
            table.add_column(col, justify="right" if col in ("nodes", "weight bytes") else "left")
        for stage, st in self.stages:
            top = ", ".join(f"{k} {v}" for k, v in list(st["op_types"].items())[:5])
            table.add_row(stage, str(st["nodes"]), f"{st['weight_bytes']:,}", top)
        return table


def _ort_offline(model: Any, level: str) -> Any:
    """Run ORT's offline optimizer at ``level`` (CPU provider, so no device-specific kernels are chosen)."""
    import onnx  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="wmdeploy_opt_") as tmp:
        src = os.path.join(tmp, "in.onnx")
        dst = os.path.join(tmp, "out.onnx")
        onnx.save(model, src)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
        opts.optimized_model_filepath = dst
        try:
            ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelFileError(f"ONNX Runtime cannot load the model to optimize it: {' '.join(str(exc).split())}") from None
        return onnx.load(dst)


def optimize(source: str | Path, output: str | Path, *, level: str = "basic", slim: bool = True,
             verify_steps: int = 16, atol: float = 1e-4, rtol: float = 1e-3) -> OptimizeReport:
    """Simplify ``source`` into ``output``; keep the spec, record lineage, verify against the source.

    ``level`` is ``basic`` (portable; default), ``extended`` (ORT CPU/CUDA only) or ``none`` (onnxslim
    only). ``all`` is refused because the saved file would be tied to this machine.
    """
    source, output = Path(source), Path(output)
    if level == "all":
        raise ModelFileError("--level all: a graph optimized offline at level ALL is tied to the machine that made it; "
                             "save at basic or extended (ORT applies ALL by itself when a session starts)")
    if level not in LEVELS:
        raise ModelFileError(f"--level {level!r}: expected one of {', '.join(LEVELS)}")
    model, spec, lineage = load_transform_source(source, output, ModelFileError)
    report = OptimizeReport(str(source), str(output), level, PORTABILITY[level])
    report.stages.append(("source", graph_stats(model)))
    if slim:
        import onnxslim  # noqa: PLC0415

        try:
            model = onnxslim.slim(model)
        except Exception as exc:  # onnxslim raises assorted types on graphs it cannot handle
            raise ModelFileError(f"{source}: onnxslim failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
        report.stages.append(("onnxslim", graph_stats(model)))
    if LEVELS[level] is not None:
        model = _ort_offline(model, level)
        report.stages.append((f"ort {level}", graph_stats(model)))
    record = make_record("optimize", source, {"level": level, "slim": slim},
                         nodes=[report.before["nodes"], report.after["nodes"]],
                         weight_bytes=[report.before["weight_bytes"], report.after["weight_bytes"]])
    save_checked(model, output, spec, lineage, record)
    if verify_steps:
        from ..verifier import verify  # noqa: PLC0415

        check = verify(output, source, chunks=(1, 7), batches=(1, 2), steps=verify_steps, atol=atol, rtol=rtol)
        report.verify_summary = check.summary()
        if not check.ok:
            output.unlink(missing_ok=True)
            raise VerificationError(f"{output}: the optimized graph disagrees with {source}: {check.summary()} "
                                    "(file removed)", check)
    return report
