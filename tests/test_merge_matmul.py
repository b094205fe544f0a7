"""merge_matmul: sibling MatMuls (q/k/v, gate/up) become one MatMul + Split with the same numbers."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import onnxruntime as ort  # noqa: E402

from wmdeploy.transform.merge_matmul import merge_sibling_matmuls  # noqa: E402


def _model(shared_weight: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = {n: rng.standard_normal((8, k)).astype(np.float32) for n, k in (("wq", 8), ("wk", 4), ("wv", 4), ("wo", 6))}
    nodes = [helper.make_node("MatMul", ["x", n], [f"y_{n}"]) for n in ("wq", "wk", "wv")]
    nodes.append(helper.make_node("MatMul", ["x2", "wk" if shared_weight else "wo"], ["y_other"]))
    outs = [helper.make_tensor_value_info(f"y_{n}", TensorProto.FLOAT, ["b", w[n].shape[1]]) for n in ("wq", "wk", "wv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8]),
                                           helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["b", 8])],
                              outs + [helper.make_tensor_value_info("y_other", TensorProto.FLOAT, ["b", 4 if shared_weight else 6])],
                              [numpy_helper.from_array(a, n) for n, a in w.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto) -> list[np.ndarray]:
    feeds = {"x": np.arange(24, dtype=np.float32).reshape(3, 8) / 7, "x2": np.ones((3, 8), np.float32)}
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_siblings_merge_into_one_matmul_with_the_same_outputs():
    model = _model()
    before = _run(model)
    assert merge_sibling_matmuls(model) == 2
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMul") == 2 and ops.count("Split") == 1  # q/k/v as one, the other alone
    for a, b in zip(before, _run(model)):
        np.testing.assert_array_equal(a, b)


def test_a_weight_read_twice_is_left_alone():
    model = _model(shared_weight=True)
    before = _run(model)
    assert merge_sibling_matmuls(model) == 1  # q and v merge; k's weight is shared with another MatMul
    for a, b in zip(before, _run(model)):
        np.testing.assert_array_equal(a, b)


def _siblings(opset: int = 17, weights_as_inputs: bool = False, weight_as_output: bool = False,
              weight_in_subgraph: bool = False) -> onnx.ModelProto:
    """x @ wq and x @ wk, with wk (or both) also visible outside the two MatMuls in the ways a graph allows."""
    rng = np.random.default_rng(1)
    w = {n: rng.standard_normal((8, 4)).astype(np.float32) for n in ("wq", "wk")}
    nodes = [helper.make_node("MatMul", ["x", n], [f"y_{n}"]) for n in w]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])]
    outputs = [helper.make_tensor_value_info(f"y_{n}", TensorProto.FLOAT, ["b", 4]) for n in w]
    if weights_as_inputs:  # keep_initializers_as_inputs=True exporters: overridable defaults
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [8, 4]) for n in w]
    if weight_as_output:
        outputs.append(helper.make_tensor_value_info("wk", TensorProto.FLOAT, [8, 4]))
    if weight_in_subgraph:  # an If branch reads the weight from the outer scope
        body = helper.make_graph([helper.make_node("Identity", ["wk"], ["o"])], "body", [],
                                 [helper.make_tensor_value_info("o", TensorProto.FLOAT, [8, 4])])
        nodes.append(helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))))
        nodes.append(helper.make_node("If", ["c"], ["from_if"], then_branch=body, else_branch=body))
        outputs.append(helper.make_tensor_value_info("from_if", TensorProto.FLOAT, [8, 4]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in w.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("case", [{"opset": 12}, {"opset": 11}, {"weights_as_inputs": True},
                                  {"weight_as_output": True}, {"weight_in_subgraph": True}],
                         ids=["opset12", "opset11", "weights-as-inputs", "weight-as-output", "weight-in-subgraph"])
def test_a_merge_never_breaks_the_graph(case):
    """Split takes its sizes as an input from opset 13 only; a weight that is also a graph input (an overridable
    default), a graph output or read inside a subgraph is read by more than the MatMul: each stays as it was."""
    model = _siblings(**case)
    feeds = {"x": np.arange(16, dtype=np.float32).reshape(2, 8) / 5}
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    merge_sibling_matmuls(model)
    onnx.checker.check_model(model)
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
