"""``fp16`` mode: float16 weights and compute, with the recurrent ops and their layout neighbours kept
float32 (ORT's CPU provider has no float16 recurrent kernels; see ``wmdeploy.transform.quantizer``'s module doc)."""
from __future__ import annotations

from typing import Any

from .precision import RECURRENT_OPS

_LAYOUT_OPS = {"Transpose", "Squeeze", "Unsqueeze", "Reshape", "Slice", "Concat"}


def _fp16(model: Any, keep_io_types: bool) -> Any:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16  # noqa: PLC0415

    # keep the chain of layout ops on either side of a recurrent op in float32 as well: a float16
    # Transpose behind a Cast behind Squeeze(LSTM) is the pattern that crashes ORT 1.32 at level ALL
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    blocked: set[str] = set()
    todo = [(n, d) for n in model.graph.node if n.op_type in RECURRENT_OPS for d in ("up", "down")]
    while todo:
        node, direction = todo.pop()
        nxt = ([producers[i] for i in node.input if i in producers] if direction == "up"
               else [c for o in node.output for c in consumers.get(o, [])])
        for m in nxt:
            if m.op_type in _LAYOUT_OPS and m.name and m.name not in blocked:
                blocked.add(m.name)
                todo.append((m, direction))
    converted = convert_float_to_float16(model, keep_io_types=keep_io_types,
                                         op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(RECURRENT_OPS),
                                         node_block_list=sorted(blocked))
    # onnxruntime 1.31's converter inserts the Cast back to float32 once per float32 consumer of a cast
    # graph input, each with the same name and output; ONNX Runtime then refuses the model ("two nodes
    # with same node name", seen on the GPU machine). The copies are identical: keep the first.
    kept, seen = [], set()
    for node in converted.graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            kept.append(node)
    if len(kept) != len(converted.graph.node):
        del converted.graph.node[:]
        converted.graph.node.extend(kept)
    return converted


def _fp16_spec(spec: Any) -> Any:
    """The spec of a graph whose float32 boundary tensors became float16 (``keep_io_types=False``)."""
    from dataclasses import replace  # noqa: PLC0415

    from ..contract import StreamingSpec  # noqa: PLC0415

    def half(x: Any) -> Any:
        return replace(x, dtype="float16") if x.dtype == "float32" else x

    return StreamingSpec([half(t) for t in spec.inputs], [half(t) for t in spec.outputs],
                         [half(s) for s in spec.states], spec.constants, spec.chunk_invariant, spec.meta)
