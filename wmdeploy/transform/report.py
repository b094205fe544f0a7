"""``QuantizeReport``: what ``wmdeploy quantize`` did, per op type with a weight, and why what stayed float did."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .precision import RECURRENT_OPS

_INT4_RECURRENT = ("int4 cannot apply to the ONNX LSTM/GRU/RNN ops (ONNX Runtime's 4-bit MatMulNBits takes 2-D "
                   "MatMul weights only; no 4-bit recurrent kernel): kept float32")
WHY_FLOAT = {
    "int8-dynamic": {"GRU": "ORT dynamic quantization has no GRU kernel (only DynamicQuantizeLSTM)",
                     "RNN": "ORT dynamic quantization has no RNN kernel",
                     "Gemm": "ORT dynamic quantization does not cover Gemm"},
    "int8-static": {"LSTM": "ORT's QDQ quantizer has no recurrent ops: the recurrent core runs in float",
                    "GRU": "ORT's QDQ quantizer has no recurrent ops: the recurrent core runs in float",
                    "RNN": "ORT's QDQ quantizer has no recurrent ops: the recurrent core runs in float"},
    "fp16": {op: "ORT's CPU provider has no float16 recurrent kernel; kept float32" for op in RECURRENT_OPS},
    "int4": {**{op: _INT4_RECURRENT for op in RECURRENT_OPS},
             "LSTM": f"{_INT4_RECURRENT}; --lstm-as-matmuls rewrites an LSTM as MatMuls + Scan that can be 4-bit",
             "Gemm": "int4 covers MatMul and embedding Gather only (MatMulNBits, GatherBlockQuantized)",
             "Conv": "int4 covers MatMul and embedding Gather only (MatMulNBits, GatherBlockQuantized)",
             "Attention": "int4 covers MatMul and embedding Gather only (MatMulNBits, GatherBlockQuantized)"},
}


@dataclass
class QuantizeReport:
    source: str
    output: str
    mode: str
    options: dict[str, Any]
    before: dict[str, Any]
    after: dict[str, Any]
    precision: dict[str, dict[str, int]]
    recurrent_core: str
    kept_float: dict[str, str] = field(default_factory=dict)  # op type -> why
    calibration: dict[str, Any] | None = None
    check: str = ""
    float_tensors: dict[str, str] = field(default_factory=dict)  # int8-static: activations kept float -> why

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("source", "output", "mode", "options", "precision", "recurrent_core",
                                              "kept_float", "float_tensors", "calibration", "check")} | {
            "nodes": [self.before["nodes"], self.after["nodes"]],
            "weight_bytes": [self.before["weight_bytes"], self.after["weight_bytes"]]}

    def table(self) -> Any:
        from rich.markup import escape  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415

        ratio = self.after["weight_bytes"] / max(self.before["weight_bytes"], 1)
        table = Table(title=escape(f"quantize {self.mode}: {self.source} -> {self.output} (weights {self.before['weight_bytes']:,} "
                                   f"-> {self.after['weight_bytes']:,} bytes, x{ratio:.2f}; nodes {self.before['nodes']} -> "
                                   f"{self.after['nodes']})"))
        # the int4 column only where something is 4-bit: the int8/fp16 reports keep their columns
        kinds = [k for k in ("int4", "int8", "fp16", "float32") if k != "int4" or any(c.get("int4") for c in self.precision.values())]
        for col in ("op with weights", *kinds, "why float"):
            table.add_column(col, justify="left" if col.startswith(("op", "why")) else "right")
        for op, c in sorted(self.precision.items()):
            table.add_row(op, *(str(c.get(k, 0)) for k in kinds), self.kept_float.get(op, ""))
        return table


def _recurrent_summary(source: Any, precision: dict[str, dict[str, int]], mode: str) -> str:
    ops = {n.op_type for n in source.graph.node}
    parts = []
    for op in RECURRENT_OPS:
        if op in ops:
            c = precision.get(op, {})
            kind = "int4" if c.get("int4") else "int8" if c.get("int8") else "fp16" if c.get("fp16") else "float32"
            why = "" if kind != "float32" else f" ({WHY_FLOAT.get(mode, {}).get(op, 'not covered by this mode')})"
            parts.append(f"{op}: {kind}{why}")
    for op in ("Loop", "Scan"):
        if op in ops:
            inner = ("ORT's static quantizer neither calibrates nor quantizes loop bodies: the recurrence stays float"
                     if mode == "int8-static" else "the ops inside are quantized as the table shows")
            parts.append(f"{op} (recurrence written as a graph loop): {inner}")
    return "; ".join(parts) or "no recurrent op: the state is carried by ordinary ops (see the table)"
