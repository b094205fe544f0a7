"""The drift report against a hand-computed case, its LM scores, buckets, JSON, plot and CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from wmdeploy.transform.calibration import StreamData
from wmdeploy.cli.app import app
from wmdeploy.contract import StateSpec, StreamingSpec, TensorSpec, write_spec
from wmdeploy.transform.drift import _finish_lm, _score_lm, drift_report, step_buckets


def _accumulator(path: Path, leak: float, offset: float) -> Path:
    """s' = s + sum_t x + leak; y = [x, x + offset] (so the error after step t is leak * t on the state)."""
    nodes = [
        helper.make_node("ReduceSum", ["x", "axes"], ["xs"], keepdims=0),
        helper.make_node("Add", ["s", "xs"], ["s1"]),
        helper.make_node("Add", ["s1", "leak"], ["s_out"]),
        helper.make_node("Unsqueeze", ["x", "axes2"], ["x3"]),
        helper.make_node("Add", ["x3", "offset"], ["x3o"]),
        helper.make_node("Concat", ["x3", "x3o"], ["y"], axis=2),
    ]
    inits = [helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
             helper.make_tensor("axes2", TensorProto.INT64, [1], [2]),
             helper.make_tensor("leak", TensorProto.FLOAT, [], [leak]),
             helper.make_tensor("offset", TensorProto.FLOAT, [], [offset])]
    graph = helper.make_graph(
        nodes, "acc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "time"]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "time", 2]),
         helper.make_tensor_value_info("s_out", TensorProto.FLOAT, ["batch"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    spec = StreamingSpec([TensorSpec("x", ["batch", "time"])], [TensorSpec("y", ["batch", "time", 2])],
                         [StateSpec("s", ["batch"])])
    write_spec(model, spec)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("drift")
    return _accumulator(d / "cand.onnx", 0.5, 0.25), _accumulator(d / "ref.onnx", 0.0, 0.0)


def test_buckets() -> None:
    assert step_buckets(2048) == [(1, 16), (17, 128), (129, 1024), (1025, 2048)]
    assert step_buckets(10) == [(1, 10)]


def test_drift_numbers_match_hand_computation(pair: tuple[Path, Path]) -> None:
    cand, ref = pair
    ones = StreamData({"x": np.ones((1, 200), np.float32)}, 200, "file", "ones")
    r = drift_report(cand, ref, steps=200, streams=ones)
    assert r.buckets == [(1, 16), (17, 128), (129, 200)]
    state = r.tensors["s"]
    # after step t the reference holds t and the candidate 1.5 t: error 0.5 t
    assert [b["max_abs"] for b in state] == pytest.approx([8.0, 64.0, 100.0])
    assert [b["mean_abs"] for b in state] == pytest.approx([0.5 * 8.5, 0.5 * 72.5, 0.5 * 164.5])
    assert [b["ref_max_abs"] for b in state] == pytest.approx([16, 128, 200])
    assert [b["rel"] for b in state] == pytest.approx([0.5, 0.5, 0.5])
    assert [b["cosine"] for b in state] == pytest.approx([1.0] * 3)  # same sign, one element
    y = r.tensors["y"]  # [1, 1.25] against [1, 1] at every step
    assert [b["max_abs"] for b in y] == pytest.approx([0.25] * 3)
    assert [b["mean_abs"] for b in y] == pytest.approx([0.125] * 3)
    assert y[0]["cosine"] == pytest.approx(2.25 / (np.sqrt(2) * np.sqrt(1 + 1.5625)))
    assert r.series["s"][:3] == pytest.approx([0.5, 1.0, 1.5])
    # chunked streaming: states are compared once per call, outputs once per step
    r4 = drift_report(cand, ref, steps=200, chunk=4, streams=ones)
    assert r4.tensors["s"][0]["max_abs"] == pytest.approx(2.0)  # the leak is per call: 4 calls by step 16
    assert r4.tensors["y"][2]["max_abs"] == pytest.approx(0.25)


def test_lm_scores_by_hand() -> None:
    got = np.log(np.array([[[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]]))  # [batch 1, time 2, vocab 3]
    want = np.log(np.array([[[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]]))
    targets = np.array([[0, 1]])
    lm = [{"top1": 0.0, "n": 0, "scored": 0, "ce_ref": 0.0, "ce_cand": 0.0, "acc_ref": 0.0, "acc_cand": 0.0}]
    _score_lm(lm, lambda step: 0, 0, 2, got, want, targets)
    b = _finish_lm(lm[0], "text")
    assert b["top1"] == 0.5  # step 1 agrees (0 vs 0), step 2 does not (2 vs 1)
    assert b["ce_cand"] == pytest.approx(-(np.log(0.7) + np.log(0.3)) / 2)
    assert b["ce_ref"] == pytest.approx(-(np.log(0.6) + np.log(0.5)) / 2)
    assert b["acc_cand"] == 0.5 and b["acc_ref"] == 1.0


def test_report_json_plot_and_cli(pair: tuple[Path, Path], tmp_path: Path) -> None:
    cand, ref = pair
    result = CliRunner().invoke(app, ["verify", str(cand), "--reference", str(ref), "--steps", "40",
                                      "--data", "random", "--json", str(tmp_path / "d.json"),
                                      "--plot", str(tmp_path / "d.png")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["buckets"] == ["1-16", "17-40"] and set(data["tensors"]) == {"y", "s"}
    assert (tmp_path / "d.png").stat().st_size > 1000
    # the tolerance check is still there for ONNX references
    parity = CliRunner().invoke(app, ["verify", str(cand), "--reference", str(ref), "--parity"])
    assert parity.exit_code == 1


def test_recall_drop_bound() -> None:
    """``within`` holds the recall task to its bound: accuracy of candidate against reference, in points."""
    from wmdeploy.transform.drift import DRIFT_BOUNDS, DriftReport

    def report(acc_ref: float, acc_cand: float) -> DriftReport:
        r = DriftReport("q.onnx", "f.onnx", 16, 4, 1, "recall episodes", [(1, 16)], task="recall")
        r.lm = [{"top1": 0.99, "n": 100, "scored": 50, "acc_ref": acc_ref, "acc_cand": acc_cand}]
        return r

    bound = DRIFT_BOUNDS["int8-static"]
    assert bound["max_recall_drop"] == 0.02
    assert report(0.70, 0.69).within(bound["min_top1"], bound["max_rel"], bound["max_recall_drop"]) == (True, "")
    ok, why = report(0.70, 0.15).within(bound["min_top1"], bound["max_rel"], bound["max_recall_drop"])
    assert not ok and "55.0 points below" in why


def test_bad_npz_targets_empty_streams_and_steps_are_one_line_errors(pair: tuple[Path, Path], tmp_path: Path) -> None:
    from wmdeploy.transform.calibration import load_npz
    from wmdeploy.errors import InputError

    cand, ref = pair
    x = np.ones((2, 20), np.float32)
    cases = {"short.npz": {"x": x, "targets": np.zeros((2, 5), np.int64)},
             "float.npz": {"x": x, "targets": np.zeros((2, 20), np.float32)},
             "batch.npz": {"x": x, "targets": np.zeros((3, 20), np.int64)},
             "empty.npz": {"x": np.ones((2, 0), np.float32)}}
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
        result = CliRunner().invoke(app, ["verify", str(cand), "--reference", str(ref), "--data", str(tmp_path / name)])
        assert result.exit_code == 2, (name, result.output)
        assert name in result.output and "Traceback" not in result.output, result.output
    for steps in ("0", "-5"):
        result = CliRunner().invoke(app, ["verify", str(cand), "--reference", str(ref), "--steps", steps,
                                          "--data", "random"])
        assert result.exit_code == 2 and f"--steps {steps}" in result.output, result.output
    # target ids outside the vocabulary would index logits silently (negative) or crash (too large)
    lm_spec = StreamingSpec([TensorSpec("x", ["batch", "time"])], [TensorSpec("y", ["batch", "time", 2])],
                            [StateSpec("s", ["batch"])], meta={"vocab_size": 2})
    for bad in (-5, 7):
        np.savez(tmp_path / "ids.npz", x=x, targets=np.full((2, 20), bad, np.int64))
        with pytest.raises(InputError, match=f"holds {bad}"):
            load_npz(tmp_path / "ids.npz", lm_spec)
    np.savez(tmp_path / "fine.npz", x=x, targets=np.full((2, 20), -100, np.int64))
    assert load_npz(tmp_path / "fine.npz", lm_spec).length == 20


def test_verify_exits_1_when_drift_passes_the_bound_of_the_files_last_transform(pair: tuple[Path, Path],
                                                                                 tmp_path: Path) -> None:
    """A file whose lineage says int8-dynamic is held to that mode's bound on its outputs: an output off by
    1.0 (relative error ~0.5, past the bound's 0.25) fails with exit 1 and names the bound; the same file with
    no lineage has no bound and passes."""
    from wmdeploy.contract import read_spec
    from wmdeploy.transform.lineage import make_record, save_checked

    _, ref = pair
    cand = _accumulator(tmp_path / "far.onnx", 0.5, 1.0)
    marked = tmp_path / "cand.int8.onnx"
    save_checked(onnx.load(str(cand)), marked, read_spec(cand), [],
                 make_record("quantize", cand, {"mode": "int8-dynamic"}))
    result = CliRunner().invoke(app, ["verify", str(marked), "--reference", str(ref), "--steps", "40",
                                      "--data", "random"])
    assert result.exit_code == 1, result.output
    assert "drift beyond the int8-dynamic bound" in " ".join(result.output.split())
    plain = CliRunner().invoke(app, ["verify", str(cand), "--reference", str(ref), "--steps", "40", "--data", "random"])
    assert plain.exit_code == 0, plain.output
