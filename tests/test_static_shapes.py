"""``transform/static_shapes``: computed Reshape targets become constants, identity reshape pairs go, and the
graph computes the same thing at every batch and time (run on ONNX Runtime)."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from wmdeploy.transform.static_shapes import drop_dead_nodes, drop_output_copies, fold_reshape_targets  # noqa: E402


def _const(name: str, values: list[int]) -> object:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _heads_graph() -> object:
    """x [batch, time, 8] -> view(*x.shape[:-1], -1, 4) (traced Shape/Gather/Unsqueeze/Concat) -> Relu -> the
    same heads joined back through a second, computed reshape -> [batch, time, 8]; plus y [batch, time] flattened
    by a computed batch * time (-1 says it) and reshaped to [time, batch] (two dimensions that are no copies of
    the input's at their positions: not provable, stays computed)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "i0"], ["b"], axis=0),
        helper.make_node("Gather", ["shape", "i1"], ["t"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axis0"], ["b1"]),
        helper.make_node("Unsqueeze", ["t", "axis0"], ["t1"]),
        helper.make_node("Concat", ["b1", "t1", "minus1", "four"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["heads"]),
        helper.make_node("Relu", ["heads"], ["act"]),
        helper.make_node("Concat", ["b1", "t1", "eight"], ["back"], axis=0),
        helper.make_node("Reshape", ["act", "back"], ["joined"]),
        helper.make_node("Reshape", ["joined", "back"], ["out"]),  # a pair with the same shape: the identity
        helper.make_node("Mul", ["b1", "t1"], ["bt"]),
        helper.make_node("Reshape", ["y", "bt"], ["flat"]),
        helper.make_node("Concat", ["t1", "b1"], ["tb"], axis=0),
        helper.make_node("Reshape", ["y", "tb"], ["swapped"]),
    ]
    inits = [_const("i0", [0]), _const("i1", [1]), _const("axis0", [0]), _const("minus1", [-1]),
             _const("four", [4]), _const("eight", [8])]
    for t in inits[:2]:  # scalar indices: Gather then yields scalars, as the exporter writes them
        t.dims[:] = []
    graph = helper.make_graph(
        nodes, "heads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "time", 8]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "time"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("heads", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("flat", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("swapped", TensorProto.FLOAT, None)],
        initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: object, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "y": y})


def test_computed_targets_become_constants_and_the_graph_computes_the_same():
    model = _heads_graph()
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    rewritten = fold_reshape_targets(folded)
    assert rewritten >= 3  # the heads view, the join (then dropped with its pair) and the pair itself
    ops = [n.op_type for n in folded.graph.node]
    inits = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    view = next(n for n in folded.graph.node if n.output[0] == "heads")
    assert inits[view.input[1]].tolist() == [0, 0, 2, 4]  # batch and time copied from x, the heads counted
    # the identity pair is gone: one Reshape joins the heads back, straight into the graph output
    assert ops.count("Reshape") == 4 and "Relu" in ops
    flat = next(n for n in folded.graph.node if n.output[0] == "flat")
    assert inits[flat.input[1]].tolist() == [-1]
    # [time, batch] needs two dimensions no Reshape constant can name: it keeps its arithmetic
    swapped = next(n for n in folded.graph.node if n.output[0] == "swapped")
    assert swapped.input[1] not in inits and "Shape" in ops
    rng = np.random.default_rng(0)
    for b, t in ((1, 1), (2, 3), (3, 7)):
        x = rng.standard_normal((b, t, 8)).astype(np.float32)
        y = rng.standard_normal((b, t)).astype(np.float32)
        for want, got in zip(_run(model, x, y), _run(folded, x, y)):
            np.testing.assert_array_equal(want, got)


def test_a_graph_symbolic_inference_cannot_read_is_left_as_it_was(tmp_path, monkeypatch):
    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="example.unknown")
    graph = helper.make_graph([node], "unknown", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.unknown", 1)])
    before = model.SerializeToString()
    monkeypatch.chdir(tmp_path)
    assert fold_reshape_targets(model) == 0
    assert model.SerializeToString() == before
    # ORT's infer_shapes writes its debug model (and the weights) to the working directory when shapes stay
    # unknown: ours never does
    assert not list(tmp_path.iterdir())


def test_dead_node_pass_keeps_what_only_a_subgraph_reads():
    """An If branch reads an outer initializer and an outer node's output: neither is dead; a node nothing reads
    and an initializer nothing reads are."""
    then_branch = helper.make_graph([helper.make_node("Add", ["h", "w"], ["t_out"])], "then", [],
                                    [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [2])])
    else_branch = helper.make_graph([helper.make_node("Identity", ["h"], ["e_out"])], "else", [],
                                    [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [2])])
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Neg", ["x"], ["unused"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)]
    graph = helper.make_graph(
        nodes, "branches",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        initializer=[numpy_helper.from_array(np.ones(2, np.float32), "w"),
                     numpy_helper.from_array(np.ones(2, np.float32), "stale")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert drop_dead_nodes(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Relu", "If"]
    assert [i.name for i in model.graph.initializer] == ["w"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([-1.0, 2.0], np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x, "cond": np.array(True)})[0], [1.0, 3.0])


def test_outputs_that_are_copies_are_written_by_their_producers():
    """``state = Cast(Cast(Add(x, 1), float), float)`` (traced ``.float()`` twice: two full copies a run) becomes the
    Add itself, whose other reader follows it; a Cast that converts (int64 -> float) and an Identity of a graph
    input stay, since nothing else can produce them."""
    nodes = [helper.make_node("Add", ["x", "one"], ["sum"]),
             helper.make_node("Cast", ["sum"], ["c1"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["c1"], ["state"], to=TensorProto.FLOAT),
             helper.make_node("Relu", ["sum"], ["act"]),
             helper.make_node("Cast", ["n"], ["n_float"], to=TensorProto.FLOAT),
             helper.make_node("Identity", ["x"], ["x_copy"])]
    graph = helper.make_graph(
        nodes, "copies",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("n", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("state", "act", "n_float", "x_copy")],
        initializer=[numpy_helper.from_array(np.ones(1, np.float32), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = onnx.ModelProto()
    before.CopyFrom(model)
    assert drop_output_copies(model) == 2
    ops = {n.output[0]: n.op_type for n in model.graph.node}
    assert ops == {"state": "Add", "act": "Relu", "n_float": "Cast", "x_copy": "Identity"}
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    feeds = {"x": x, "n": np.array([3, 4], np.int64)}
    want = ort.InferenceSession(before.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)


def test_a_copy_of_what_a_subgraph_reads_by_name_stays():
    """An If branch reads ``sum`` from the outer scope: renaming ``sum`` to the output would leave the branch
    reading a name nothing makes, so that copy stays; the other output's copy in the same graph still goes."""
    then_branch = helper.make_graph([helper.make_node("Neg", ["sum"], ["t_out"])], "then", [],
                                    [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [2])])
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["e_out"])], "else", [],
                                    [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [2])])
    nodes = [helper.make_node("Add", ["x", "x"], ["sum"]),
             helper.make_node("Cast", ["sum"], ["state"], to=TensorProto.FLOAT),
             helper.make_node("Relu", ["x"], ["act"]),
             helper.make_node("Identity", ["act"], ["act_out"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)]
    graph = helper.make_graph(
        nodes, "branches",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("state", "act_out", "y")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert drop_output_copies(model) == 1
    ops = {n.output[0]: n.op_type for n in model.graph.node}
    assert ops["state"] == "Cast" and ops["act_out"] == "Relu"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": np.array([1.0, -2.0], np.float32), "cond": np.array(True)})
    np.testing.assert_array_equal(out[0], [2.0, -4.0])
    np.testing.assert_array_equal(out[1], [1.0, 0.0])
    np.testing.assert_array_equal(out[2], [-2.0, 4.0])
