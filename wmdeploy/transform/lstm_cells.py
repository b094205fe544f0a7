"""ONNX ``LSTM`` ops rewritten as plain MatMuls and a ``Scan``, so that their weights can be 4-bit.

No kernel takes an ``LSTM``'s weights in 4 bits: ``MatMulNBits`` is a MatMul. The same recurrence, written out:

* ``X W^T + b`` for every step at once: one MatMul ``[T, B, I] x [I, 4H]`` outside the loop (with both biases
  added), the input half of the weights;
* a ``Scan`` over time holding ``(h, c)``, whose body is ``g = xw_t + h R^T``, ``i, o, f, c~ = split(g)`` (ONNX's
  gate order), ``c' = sigmoid(f) c + sigmoid(i) tanh(c~)``, ``h' = sigmoid(o) tanh(c')``: the recurrent half, a
  ``[B, H] x [H, 4H]`` MatMul whose weight is an initializer of the body (the int4 quantizer walks subgraphs);
* ``Y``, ``Y_h``, ``Y_c`` in the LSTM's own layouts and names, so nothing downstream changes.

Only what this form reproduces exactly is rewritten: forward direction, the default activations, no clip, no
``input_forget``, no peepholes, no ``sequence_lens``, ``layout`` 0, initial states given. Anything else keeps its
``LSTM`` (and stays float32 under int4, as before). Same math, other summation order: ~1e-6 from the op.
"""
from __future__ import annotations

from typing import Any

from .graph_reads import default_opset
from .static_shapes import drop_dead_nodes

DEFAULT_ACTIVATIONS = [b"Sigmoid", b"Tanh", b"Tanh"]


def _rewritable(node: Any, consts: dict[str, Any]) -> bool:
    attrs = {a.name: a for a in node.attribute}
    ins = list(node.input) + [""] * (8 - len(node.input))
    if attrs.get("direction") is not None and attrs["direction"].s not in (b"", b"forward"):
        return False
    if "activations" in attrs and list(attrs["activations"].strings) != DEFAULT_ACTIVATIONS:
        return False
    if "clip" in attrs or ("input_forget" in attrs and attrs["input_forget"].i) or ("layout" in attrs and attrs["layout"].i):
        return False
    if ins[4] or ins[7] or not ins[5] or not ins[6]:  # sequence_lens, peepholes; initial h and c are needed
        return False
    return all(name in consts for name in ins[1:3]) and (not ins[3] or ins[3] in consts)


def _body(name: str, hidden: int, r_t: Any) -> Any:
    """The Scan body: (h, c, xw_t) -> (h', c', h')."""
    import numpy as np  # noqa: PLC0415
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    n = helper.make_node
    nodes = [
        n("MatMul", ["h", "r_t"], ["hr"], name=f"{name}/recurrent/MatMul"),
        n("Add", ["xw", "hr"], ["gates"]),
        n("Split", ["gates", "sizes"], ["i_", "o_", "f_", "c_"], axis=-1),
        n("Sigmoid", ["i_"], ["i"]), n("Sigmoid", ["o_"], ["o"]), n("Sigmoid", ["f_"], ["f"]),
        n("Tanh", ["c_"], ["cc"]),
        n("Mul", ["f", "c"], ["fc"]), n("Mul", ["i", "cc"], ["icc"]), n("Add", ["fc", "icc"], ["c_next"]),
        n("Tanh", ["c_next"], ["tc"]), n("Mul", ["o", "tc"], ["h_next"]),
        n("Identity", ["h_next"], ["y"]),
    ]
    f32 = TensorProto.FLOAT
    return helper.make_graph(
        nodes, f"{name}_cell",
        [helper.make_tensor_value_info("h", f32, None), helper.make_tensor_value_info("c", f32, None),
         helper.make_tensor_value_info("xw", f32, None)],
        [helper.make_tensor_value_info("h_next", f32, None), helper.make_tensor_value_info("c_next", f32, None),
         helper.make_tensor_value_info("y", f32, None)],
        [numpy_helper.from_array(np.ascontiguousarray(r_t), "r_t"),
         numpy_helper.from_array(np.full(4, hidden, np.int64), "sizes")])


def lstm_as_matmuls(model: Any) -> int:
    """Rewrite, in ``model`` (an ``onnx.ModelProto``, opset >= 16), every LSTM the module doc allows; return how
    many were rewritten."""
    import numpy as np  # noqa: PLC0415
    from onnx import helper, numpy_helper  # noqa: PLC0415

    graph = model.graph
    if default_opset(model) < 16:
        return 0  # Scan-16's shapes, Split taking its sizes as an input
    consts = {i.name: i for i in graph.initializer}
    done = 0
    for index in reversed(range(len(graph.node))):
        node = graph.node[index]
        if node.op_type != "LSTM" or node.domain not in ("", "ai.onnx") or not _rewritable(node, consts):
            continue
        name = node.name or f"lstm{index}"
        hidden = next(a.i for a in node.attribute if a.name == "hidden_size")
        w = numpy_helper.to_array(consts[node.input[1]])[0]          # [4H, I]
        r = numpy_helper.to_array(consts[node.input[2]])[0]          # [4H, H]
        bias = (numpy_helper.to_array(consts[node.input[3]])[0].reshape(2, 4 * hidden).sum(0)
                if len(node.input) > 3 and node.input[3] else np.zeros(4 * hidden, w.dtype))
        p = f"{name}/as_matmuls"
        graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(w.T), f"{p}/w_t"),
                                  numpy_helper.from_array(bias.astype(w.dtype), f"{p}/bias"),
                                  numpy_helper.from_array(np.array([0], np.int64), f"{p}/axis0"),
                                  numpy_helper.from_array(np.array([1], np.int64), f"{p}/axis1")])
        outs = list(node.output) + [""] * (3 - len(node.output))
        y, y_h, y_c = (o or f"{p}/unused_{k}" for k, o in enumerate(outs))
        new = [
            helper.make_node("MatMul", [node.input[0], f"{p}/w_t"], [f"{p}/xw"], name=f"{p}/input/MatMul"),
            helper.make_node("Add", [f"{p}/xw", f"{p}/bias"], [f"{p}/xwb"]),
            helper.make_node("Squeeze", [node.input[5], f"{p}/axis0"], [f"{p}/h0"]),
            helper.make_node("Squeeze", [node.input[6], f"{p}/axis0"], [f"{p}/c0"]),
            helper.make_node("Scan", [f"{p}/h0", f"{p}/c0", f"{p}/xwb"], [f"{p}/hT", f"{p}/cT", f"{p}/ys"],
                             name=f"{p}/Scan", num_scan_inputs=1, body=_body(p, hidden, r.T)),
            helper.make_node("Unsqueeze", [f"{p}/ys", f"{p}/axis1"], [y]),
            helper.make_node("Unsqueeze", [f"{p}/hT", f"{p}/axis0"], [y_h]),
            helper.make_node("Unsqueeze", [f"{p}/cT", f"{p}/axis0"], [y_c]),
        ]
        del graph.node[index]
        for k, item in enumerate(new):
            graph.node.insert(index + k, item)
        done += 1
    if done:
        drop_dead_nodes(model)  # the LSTM's own weights
    return done
