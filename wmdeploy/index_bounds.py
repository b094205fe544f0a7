"""Finding the range of an integer input from the graph: the rows of the embedding table it indexes.

A user's own language model rarely declares ``meta.vocab_size``, and ONNX ``Gather`` does not refuse a bad
index the way a caller would want: ``-1`` silently reads the last row (a wrong answer, no error) and an id
past the table fails inside the engine (a ``BackendError``, a 500 from a server). So ``export`` and
``annotate`` look for the table here and record its row count as the input's ``index_bound`` in the spec;
the runtime then refuses ids outside ``[0, N)`` before anything runs.

The rule: follow an integer graph input forward through ops that only move or retype its values (casts,
reshapes, squeezes, ...) to every ``Gather`` that takes it as *indices*; when the gathered data is a constant
table (an initializer, a ``Constant``, or one dequantized from either, as int8 quantization leaves it), its
size on the gather axis is a bound. The smallest bound over all such tables wins (each must accept the id).
An input that reaches no such table gets none: nothing is guessed.

Torch-free; it takes an ``onnx.ModelProto`` (the callers already hold one), so importing it costs nothing.
"""
from __future__ import annotations

from typing import Any

from .contract import DTYPES, StreamingSpec, TensorSpec

#: ops whose output holds (a rearrangement of) the same integer values as their first input
_PASS_THROUGH = {"Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Transpose", "Expand"}
#: ops between a stored table and the Gather that keep its row count (quantized embeddings)
_TABLE_OPS = {"DequantizeLinear", "Cast", "Identity"}


def _table_rows(name: str, axis: int, producers: dict[str, Any], tables: dict[str, list[int]]) -> int | None:
    """Rows along ``axis`` of the constant table behind tensor ``name``; ``None`` if it is not a constant."""
    for _ in range(8):  # a short chain at most; a loop in a malformed graph must not hang us
        if name in tables:
            dims = tables[name]
            return int(dims[axis]) if -len(dims) <= axis < len(dims) and dims[axis] > 0 else None
        node = producers.get(name)
        if node is None or node.op_type not in _TABLE_OPS or not node.input:
            return None
        name = node.input[0]
    return None


def infer_index_bounds(model: Any, names: list[str]) -> dict[str, int]:
    """``{input: rows}`` for each of ``names`` (integer graph inputs) that indexes a constant table."""
    graph = model.graph
    tables: dict[str, list[int]] = {t.name: list(t.dims) for t in graph.initializer}
    producers: dict[str, Any] = {}
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for out in node.output:
            producers[out] = node
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and node.output:
                    tables[node.output[0]] = list(attr.t.dims)
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    bounds: dict[str, int] = {}
    for start in names:
        found: list[int] = []
        seen, todo = {start}, [start]
        while todo:
            name = todo.pop()
            for node, i in consumers.get(name, []):
                if node.op_type == "Gather" and i == 1:
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    rows = _table_rows(node.input[0], axis, producers, tables)
                    if rows is not None:
                        found.append(rows)
                elif node.op_type in _PASS_THROUGH and i == 0:
                    for out in node.output:
                        if out and out not in seen:
                            seen.add(out)
                            todo.append(out)
        if found:
            bounds[start] = min(found)
    return bounds


def with_index_bounds(spec: StreamingSpec, model: Any) -> StreamingSpec:
    """``spec`` with ``index_bound`` set on every integer data input whose table the graph shows (inputs
    that already declare one keep it)."""
    todo = [t.name for t in spec.inputs if DTYPES[t.dtype].kind in "iu" and t.index_bound is None]
    bounds = infer_index_bounds(model, todo) if todo else {}
    if not bounds:
        return spec
    inputs = [TensorSpec(t.name, t.shape, t.dtype, t.doc, bounds.get(t.name, t.index_bound)) for t in spec.inputs]
    return StreamingSpec(inputs, spec.outputs, spec.states, spec.constants, spec.chunk_invariant, dict(spec.meta))
