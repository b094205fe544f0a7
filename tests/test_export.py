"""Export of models written only against the contract: dynamic axes, names, metadata, errors."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import wmdeploy
from wmdeploy import ExportError, VerificationError, read_spec
from wmdeploy.torch_module import load_module, run_module
from tests import contract_models as cm


def _declared(model: onnx.ModelProto) -> dict[str, list]:
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*model.graph.input, *model.graph.output)}


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory):
    torch.manual_seed(0)
    module = cm.make_mixed(hidden=8).eval()
    path = tmp_path_factory.mktemp("export") / "mixed.onnx"
    result = wmdeploy.export(module, path)
    return module, path, result


def test_export_names_every_tensor_from_the_spec_and_keeps_axes_dynamic(mixed_file):
    module, path, result = mixed_file
    assert result.report is not None and result.report.ok
    model = onnx.load(str(path))
    declared = _declared(model)
    assert [v.name for v in model.graph.input] == ["x", "cond", "h", "slots", "count", "last_step"]
    assert [v.name for v in model.graph.output] == ["y", "summary", "h_out", "slots_out", "count_out", "last_step_out"]
    assert declared["x"] == ["batch", "time", 6]
    assert declared["y"] == ["batch", "time", 5]
    assert declared["cond"] == ["batch", 4]
    assert declared["h"] == [2, "batch", 8] and declared["h_out"] == [2, "batch", 8]
    assert declared["count_out"] == ["batch"]
    assert read_spec(path) == module.streaming_spec()


@pytest.mark.parametrize("batch, time", [(1, 1), (5, 2), (4, 11)])
def test_exported_file_runs_at_other_batch_sizes_and_chunk_lengths(mixed_file, batch, time):
    """Sizes the export never saw (it traced batch 2, time 3): proof that no axis was specialised."""
    module, path, _ = mixed_file
    spec = module.streaming_spec()
    rng = np.random.default_rng(batch * 10 + time)
    inputs = {"x": rng.standard_normal((batch, time, 6)).astype(np.float32),
              "cond": rng.standard_normal((batch, 4)).astype(np.float32)}
    states = spec.initial_states(batch)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for _ in range(3):
        want_out, want_states = run_module(module, spec, inputs, states)
        got = sess.run(None, {**inputs, **states})
        np.testing.assert_allclose(got[0], want_out["y"], atol=1e-5)
        np.testing.assert_allclose(got[1], want_out["summary"], atol=1e-5)
        for s, value in zip(spec.states, got[2:]):
            np.testing.assert_allclose(value, want_states[s.name], atol=1e-5)
        states = want_states
    assert states["count"].tolist() == [3 * time] * batch
    assert states["last_step"][:, 0].tolist() == [3 * time - 1] * batch


def test_chunk_invariant_model_is_checked_chunked_against_whole(tmp_path):
    result = wmdeploy.export(cm.TinyLSTM(), tmp_path / "lstm.onnx")
    checks = {row.check for row in result.report.rows}
    assert checks == {"parity", "chunking"}
    assert {row.batch for row in result.report.rows} == {1, 3}
    assert result.report.schedule == [1, 7, 32, 1, 7, 32]
    worst = max(row.max_abs for row in result.report.rows)
    assert worst < 1e-5


def test_dynamo_exporter_gives_the_same_declared_shapes(tmp_path):
    module = cm.TinyLSTM().eval()
    result = wmdeploy.export(module, tmp_path / "dyn.onnx", exporter="dynamo")
    assert result.report.ok
    assert _declared(onnx.load(str(tmp_path / "dyn.onnx")))["y"] == ["batch", "time", 2]


def test_verification_catches_a_time_axis_specialised_by_tracing(tmp_path):
    with pytest.raises(VerificationError) as info:
        wmdeploy.export(cm.TimeSpecialised(), tmp_path / "bad.onnx")
    report = info.value.report
    assert not report.ok
    bad = [r for r in report.rows if not r.ok]
    assert {r.tensor for r in bad} == {"y"}
    assert "above tolerance" in str(info.value)


@pytest.mark.parametrize(
    "module, message",
    [
        (cm.NoSpec(), "NoSpec has no streaming_spec() method"),
        (cm.WrongCount(), "WrongCount.forward returned 2 tensors; the spec expects 3"),
        (cm.WrongStateShape(), "next state 'c_out' has shape [2, 1, 11], expected [2, 1, 12]"),
    ],
)
def test_contract_breaches_are_one_line_errors(tmp_path, module, message):
    with pytest.raises(ExportError) as info:
        wmdeploy.export(module, tmp_path / "x.onnx")
    assert message.replace("[2, 1, 11]", "[1, 2, 11]").replace("[2, 1, 12]", "[1, 2, 12]") in str(info.value)
    assert "\n" not in str(info.value)


def test_load_module_resolves_file_and_package_targets_with_config_and_checkpoint(tmp_path):
    torch.manual_seed(1)
    trained = cm.TinyLSTM(hidden=7)
    ckpt = tmp_path / "w.pt"
    torch.save({"state_dict": trained.state_dict(), "config": {"hidden": 7}, "epoch": 3}, ckpt)
    by_path = load_module(f"{cm.__file__}:TinyLSTM", checkpoint=ckpt)  # config from the checkpoint
    by_name = load_module("tests.contract_models:TinyLSTM", config='{"hidden": 7}', checkpoint=ckpt)
    for module in (by_path, by_name):
        assert module.hidden == 7 and not module.training
        for key, value in trained.state_dict().items():
            assert torch.equal(module.state_dict()[key], value)
    plain = tmp_path / "plain.pt"
    torch.save(trained.state_dict(), plain)
    assert load_module("tests.contract_models:make_mixed", config={"hidden": 4}).hidden == 4
    assert load_module("tests.contract_models:TinyLSTM", config={"hidden": 7}, checkpoint=plain).hidden == 7


@pytest.mark.parametrize(
    "target, kwargs, message",
    [
        ("tests.contract_models", {}, "expected path/to/file.py:Name"),
        ("tests.contract_models:Missing", {}, "has no attribute 'Missing'"),
        ("tests.no_such_module:X", {}, "cannot import module 'tests.no_such_module'"),
        ("nowhere/model.py:X", {}, "no such file nowhere/model.py"),
        ("tests.contract_models:TinyLSTM", {"config": "{bad"}, "--config: not valid JSON"),
        ("tests.contract_models:TinyLSTM", {"config": {"width": 3}}, "constructor rejected config"),
        # nn.LSTM's own ValueError used to escape as a traceback
        ("tests.contract_models:TinyLSTM", {"config": {"hidden": -1}},
         "building it with config {'hidden': -1} failed: ValueError: hidden_size must be greater than zero"),
    ],
)
def test_unresolvable_targets_are_one_line_errors(target, kwargs, message):
    with pytest.raises(ExportError) as info:
        load_module(target, **kwargs)
    assert message in str(info.value)


def test_a_checkpoint_saved_from_data_parallel_or_torch_compile_loads(tmp_path):
    """DataParallel / DistributedDataParallel save every key as 'module.<key>' and torch.compile as
    '_orig_mod.<key>': such a checkpoint was refused ("missing [...]; unexpected ['module.lstm...']")."""
    torch.manual_seed(2)
    trained = cm.TinyLSTM(hidden=7)
    ckpt = tmp_path / "dp.pt"
    state = {f"_orig_mod.module.{k}": v for k, v in trained.state_dict().items()}
    torch.save({"model_state_dict": state, "config": {"hidden": 7}, "optimizer": {"lr": 0.1}}, ckpt)
    module = load_module("tests.contract_models:TinyLSTM", checkpoint=ckpt)
    for key, value in trained.state_dict().items():
        assert torch.equal(module.state_dict()[key], value)
    # a prefix that not every key carries is not a wrapper's: still refused, naming the keys
    half = {("module." + k if i % 2 else k): v for i, (k, v) in enumerate(trained.state_dict().items())}
    torch.save(half, ckpt)
    with pytest.raises(ExportError, match="does not match TinyLSTM: missing"):
        load_module("tests.contract_models:TinyLSTM", config={"hidden": 7}, checkpoint=ckpt)


def test_mismatched_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "other.pt"
    torch.save(cm.TinyLSTM(hidden=5).state_dict(), ckpt)
    with pytest.raises(ExportError, match=r"checkpoint .*other.pt does not match TinyLSTM: shape mismatch"):
        load_module("tests.contract_models:TinyLSTM", checkpoint=ckpt)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match="cannot be loaded with weights_only=True"):
        load_module("tests.contract_models:TinyLSTM", checkpoint=junk)


def test_unwritable_output_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        target = locked / "m.onnx"
        import os
        if os.access(locked, os.W_OK):  # root ignores permissions; a folder can still be refused
            target = tmp_path
        with pytest.raises(ExportError, match="output .*(not writable|is a directory)"):
            wmdeploy.export(cm.TinyLSTM(), target)
    finally:
        locked.chmod(0o700)


def test_producer_version_is_wmdeploys_not_torchs(mixed_file):
    # producer_version kept torch's "2.13.0", so `inspect` showed "wmdeploy (torch ...) 2.13.0"
    _, path, _ = mixed_file
    model = onnx.load(str(path))
    assert model.producer_name == "wmdeploy"
    assert model.producer_version.startswith(f"{wmdeploy.__version__} (torch {torch.__version__}, ")
    assert wmdeploy.inspect_model(path)["producer"].startswith(f"wmdeploy {wmdeploy.__version__} (torch ")


def test_inspect_counts_weights_in_subgraphs_and_constant_nodes(tmp_path):
    """Exporters keep a recurrent cell's weights inside a Loop body or as Constant nodes; inspect counted the
    top-level initializers only (too few parameters, and a too-low floor in profile)."""
    import onnx
    from onnx import TensorProto as T, helper, numpy_helper

    w_outer = numpy_helper.from_array(np.ones((4, 4), np.float32), "w_outer")
    w_body = numpy_helper.from_array(np.ones((4, 3), np.float32), "w_body")
    const = helper.make_node("Constant", [], ["w_const"], value=numpy_helper.from_array(np.ones((5,), np.float32)))
    shape = helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([0], np.int64)))
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_in", "w_body"], ["y_b"]), helper.make_node("Identity", ["cond"], ["cond_out"])],
        "body", [helper.make_tensor_value_info("i", T.INT64, []), helper.make_tensor_value_info("cond", T.BOOL, []),
                 helper.make_tensor_value_info("x_in", T.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("cond_out", T.BOOL, []), helper.make_tensor_value_info("y_b", T.FLOAT, [1, 3])],
        [w_body])
    loop = helper.make_node("Loop", ["trip", "", "x"], ["y"], body=body)
    graph = helper.make_graph([const, shape, loop], "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [1, 3])],
                              [w_outer, numpy_helper.from_array(np.array(2, np.int64), "trip")])
    path = tmp_path / "loop.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    info = wmdeploy.inspect_model(path)
    assert info["parameters"] == 16 + 1 + 12 + 5  # outer weights, trip count, the body's weights, the float Constant
    assert info["weight_bytes"] == (16 + 12 + 5) * 4 + 8
