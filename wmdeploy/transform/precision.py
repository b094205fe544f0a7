"""What a written (quantized or converted) graph holds: per op type with a weight, how many nodes have
it in int4, int8, fp16 or float32, counted from the graph itself (subgraphs included), not assumed."""
from __future__ import annotations

from typing import Any

from .int4 import INT4_OPS as _INT4_OPS  # 4-bit weight-only ops, by the float op they replace

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
#: integer ops a float op becomes, by the float op it replaces
_INT_OPS = {"MatMulInteger": "MatMul", "DynamicQuantizeLSTM": "LSTM", "QAttention": "Attention",
            "DynamicQuantizeMatMul": "MatMul", "MatMulIntegerToFloat": "MatMul", "QLinearMatMul": "MatMul",
            "QGemm": "Gemm", "ConvInteger": "Conv", "QLinearConv": "Conv"}
_WEIGHT_OPS = {"MatMul": (1,), "Gemm": (1,), "Conv": (1,), "Gather": (0,), "LSTM": (1, 2), "GRU": (1, 2),
               "RNN": (1, 2), "Attention": (1,)}


def _subgraphs(node: Any) -> list[Any]:
    return [a.g for a in node.attribute if a.HasField("g")] + [g for a in node.attribute for g in a.graphs]


def weight_precision(model: Any) -> dict[str, dict[str, int]]:
    """Per float op type with a weight: how many nodes have it in int4, int8, fp16 or float32 (subgraphs included)."""
    import onnx  # noqa: PLC0415

    counts: dict[str, dict[str, int]] = {}

    def add(op: str, kind: str) -> None:
        counts.setdefault(op, {"int4": 0, "int8": 0, "fp16": 0, "float32": 0})[kind] += 1

    def walk(graph: Any, inits: dict[str, int]) -> None:
        inits = {**inits, **{i.name: i.data_type for i in graph.initializer}}
        producers = {o: n for n in graph.node for o in n.output}
        for node in graph.node:
            for sub in _subgraphs(node):
                walk(sub, inits)
            if node.op_type in _INT4_OPS:
                add(_INT4_OPS[node.op_type], "int4")
                continue
            if node.op_type in _INT_OPS:
                add(_INT_OPS[node.op_type], "int8")
                continue
            slots = _WEIGHT_OPS.get(node.op_type)
            if not slots:
                continue
            kinds = set()
            for i in slots:
                name = node.input[i] if i < len(node.input) else ""
                src = producers.get(name)
                if src is not None and src.op_type == "DequantizeLinear":
                    kinds.add("int8")
                elif src is not None and src.op_type == "Cast" and src.input[0] in inits:
                    kinds.add("fp16" if inits[src.input[0]] == onnx.TensorProto.FLOAT16 else "float32")
                elif name in inits:
                    kinds.add({onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.FLOAT: "float32"}.get(inits[name], "int8"))
            if kinds:  # a node without a constant weight (attention scores) is activation-only
                add(node.op_type, "int8" if "int8" in kinds else "fp16" if "fp16" in kinds else "float32")

    walk(model.graph, {})
    return counts
