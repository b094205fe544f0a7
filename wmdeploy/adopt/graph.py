"""Graph surgery for adopting a decoder file: rename tensors, turn inputs into computed tensors, add nodes.

The adopted graph keeps every node of the original; our nodes go either *before* them (they read only graph
inputs: the tokens and the position state) or *after* them (they read the original's outputs: the present
caches), so no topological sort is needed. Renames reach into subgraphs (``If`` bodies of merged decoders
read outer-scope tensors by name).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..contract import ONNX_CODE_TO_DTYPE, ONNX_TYPE_CODES
from ..errors import SpecError


def dims(vi: Any) -> list[int | str | None]:
    """A value's declared dims: an int where fixed, its ``dim_param`` where named, None where unknown."""
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        raise SpecError(f"tensor '{vi.name}': the graph gives it no shape; expected a known rank")
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None) for d in t.shape.dim]


def dtype(vi: Any) -> str:
    code = vi.type.tensor_type.elem_type
    if code not in ONNX_CODE_TO_DTYPE:
        raise SpecError(f"tensor '{vi.name}': ONNX element type {code} is not supported by wmdeploy")
    return ONNX_CODE_TO_DTYPE[code]


def _subgraphs(node: Any) -> list[Any]:
    from onnx import AttributeProto  # noqa: PLC0415

    out = []
    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


class Surgery:
    """Edits one ``onnx.ModelProto`` in place; :meth:`finish` splices our nodes in and rewrites the interface."""

    def __init__(self, model: Any) -> None:
        self.model, self.graph = model, model.graph
        init = {t.name for t in self.graph.initializer}
        self.inputs = {vi.name: vi for vi in self.graph.input if vi.name not in init}
        self.outputs = {vi.name: vi for vi in self.graph.output}
        self.before: list[Any] = []
        self.after: list[Any] = []
        self.new_inputs: list[Any] = []
        self.new_outputs: list[Any] = []
        self._count = 0
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if self.opset < 13:
            raise SpecError(f"the file's ONNX opset is {self.opset}; adopting needs opset 13 or newer "
                            "(re-export it, or upgrade it with onnx.version_converter)")

    # ---- building --------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"wmdeploy/{hint}_{self._count}"

    def const(self, hint: str, value: Any, np_dtype: Any = np.int64) -> str:
        from onnx import numpy_helper  # noqa: PLC0415

        name = self.fresh(hint)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=np_dtype), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], hint: str, *, after: bool = False, out: str | None = None,
           **attrs: Any) -> str:
        """Add one node (before the original graph, or after it with ``after``); returns its output's name."""
        from onnx import helper  # noqa: PLC0415

        name = out or self.fresh(hint)
        (self.after if after else self.before).append(
            helper.make_node(op_type, list(inputs), [name], name=f"wmdeploy/{hint}_node_{self._count}", **attrs))
        return name

    # ---- renaming ------------------------------------------------------------------------------------
    def rename_uses(self, old: str, new: str) -> None:
        """Every node (subgraphs included) that reads ``old`` reads ``new`` instead."""
        def walk(graph: Any) -> None:
            for node in graph.node:
                for i, name in enumerate(node.input):
                    if name == old:
                        node.input[i] = new
                for sub in _subgraphs(node):
                    if not any(old in n.output for n in sub.node):  # a subgraph's own tensor of that name shadows it
                        walk(sub)
        walk(self.graph)

    def rename_output(self, old: str, new: str) -> None:
        """The node that produces graph output ``old`` produces ``new`` (and its readers read ``new``); the graph
        output entry ``old`` is dropped: the caller declares what the output is now."""
        for node in self.graph.node:
            for i, name in enumerate(node.output):
                if name == old:
                    node.output[i] = new
        self.rename_uses(old, new)
        for vi in self.graph.value_info:
            if vi.name == old:
                vi.name = new
        self.outputs.pop(old, None)

    def replace_input(self, name: str) -> None:
        """Graph input ``name`` stops being an input: our nodes compute a tensor of that name instead."""
        self.inputs.pop(name, None)

    def drop_output(self, name: str) -> None:
        self.outputs.pop(name, None)

    def declare(self, name: str, elem: str, shape: Sequence[int | str], output: bool) -> None:
        """A new graph input or output of that dtype and shape (ints fixed, strings named)."""
        from onnx import helper  # noqa: PLC0415

        vi = helper.make_tensor_value_info(name, ONNX_TYPE_CODES[elem], list(shape))
        (self.new_outputs if output else self.new_inputs).append(vi)

    def reshape(self, vi: Any, shape: Sequence[int | str]) -> None:
        """Rewrite the declared shape of a kept input or output."""
        dim = vi.type.tensor_type.shape.dim
        for d, s in zip(dim, shape):
            if isinstance(s, int):
                d.ClearField("dim_param")
                d.dim_value = s
            else:
                d.ClearField("dim_value")
                d.dim_param = s

    # ---- finishing -----------------------------------------------------------------------------------
    def finish(self, input_order: Sequence[str], output_order: Sequence[str]) -> None:
        """Splice our nodes around the original ones and set the graph's inputs/outputs in the given order
        (the contract's: data inputs, states / data outputs, state outputs); initializer-inputs stay last."""
        kept = list(self.graph.node)
        del self.graph.node[:]
        self.graph.node.extend(self.before + kept + self.after)
        ins = {**self.inputs, **{vi.name: vi for vi in self.new_inputs}}
        outs = {**self.outputs, **{vi.name: vi for vi in self.new_outputs}}
        init = {t.name for t in self.graph.initializer}
        rest = [vi for vi in self.graph.input if vi.name in init and vi.name not in ins]
        missing = [n for n in input_order if n not in ins] + [n for n in output_order if n not in outs]
        if missing:  # a bug in a convention module, never the user's: say which tensor went astray
            raise SpecError(f"adopt: tensor '{missing[0]}' was not declared while rewriting the graph")
        new_in = [_copy(ins[n]) for n in input_order] + [_copy(vi) for vi in rest]
        new_out = [_copy(outs[n]) for n in output_order]
        del self.graph.input[:]
        self.graph.input.extend(new_in)
        del self.graph.output[:]
        self.graph.output.extend(new_out)
        # stale shapes of tensors whose length changed meaning (a growing axis is now a capacity) would only
        # confuse ONNX Runtime's shape inference: drop the declared shapes of everything we touched
        touched = set(input_order) | set(output_order)
        keep = [vi for vi in self.graph.value_info if vi.name not in touched]
        del self.graph.value_info[:]
        self.graph.value_info.extend(keep)


def _copy(vi: Any) -> Any:
    out = type(vi)()
    out.CopyFrom(vi)
    return out
