"""quantize: every zoo model through every mode loads, streams and stays within its drift bound;
stateful calibration sees real states; metadata (spec + lineage) survives; refusals are errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import wmdeploy
from wmdeploy.transform.calibration import StatefulCalibrationReader, random_streams, task_streams
from wmdeploy.cli.app import app
from wmdeploy.contract import read_spec
from wmdeploy.transform.drift import DRIFT_BOUNDS, drift_report
from wmdeploy.errors import QuantizationError
from wmdeploy.transform.lineage import file_sha256, read_lineage
from wmdeploy.transform.quantizer import MODES, SENTINEL_RANGE, _activation_range, quantize
from wmdeploy.runners import OnnxRunner

from _quant_models import SMALL_ZOO, export_small

#: modes whose drift exceeds the documented bound on a model (said in the issue note, checked here).
#: memory_tokens/int8-static used to (memory rel 0.84 at chunk 1): it was calibrated in 16-step segments
#: and streamed in 1-step ones; calibrating at the deployed chunk (default 1) puts it at ~0.1.
KNOWN_OVER_BOUND: set[tuple[str, str]] = set()


def assert_state_path_float(path: Path) -> None:
    """The int8-static rules, read from the written graph: no Q/DQ on a float state input or output, the
    nodes that read or write a state take no DequantizeLinear output, no activation quantized over a
    sentinel range (a mask fill)."""
    import onnx

    model = onnx.load(str(path))
    spec = read_spec(path)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    s_in = {s.name for s in spec.states if s.dtype.startswith("float")}
    s_out = {s.output for s in spec.states if s.dtype.startswith("float")}
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            assert n.input[0] not in s_in | s_out, f"{n.name} quantizes state {n.input[0]}"
            if n.input[0] not in inits:
                lo, hi = _activation_range(model, n, inits) or (0.0, 0.0)
                assert max(abs(lo), abs(hi)) < SENTINEL_RANGE, f"{n.input[0]} quantized over [{lo:.3g}, {hi:.3g}]"
        if set(n.input) & s_in or set(n.output) & s_out:
            for name in n.input:
                src = producer.get(name)
                assert src is None or src.op_type != "DequantizeLinear" or src.input[0] in inits, \
                    f"state node {n.name} reads quantized activation {name}"
    for name in s_out:
        assert producer[name].op_type != "DequantizeLinear", f"state output {name} leaves through Q/DQ"


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("q_zoo")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(SMALL_ZOO))
def test_every_zoo_model_every_mode(zoo_dir: Path, name: str, mode: str) -> None:
    src = export_small(name, zoo_dir)
    out = zoo_dir / f"{name}.{mode}.onnx"
    report = quantize(src, out, mode=mode, calibration_streams=2, calibration_steps=64)
    spec = read_spec(src)
    assert read_spec(out).to_dict() == spec.to_dict()  # spec preserved, re-read from the file
    rec = read_lineage(out)[-1]
    assert rec["transform"] == "quantize" and rec["options"]["mode"] == mode
    assert rec["source_sha256"] == file_sha256(src)
    assert sum(c["int8"] + c["fp16"] for c in report.precision.values()) > 0
    # loads and streams in the runtime
    model = wmdeploy.load(out)
    stream = model.stream()
    outs = stream.step(**{t.name: v for t, v in zip(spec.inputs, random_streams(spec, 1, 3).inputs.values())})
    assert all(np.isfinite(v).all() for v in outs.values())
    if mode == "int8-static":
        assert_state_path_float(out)
    drift = drift_report(out, src, steps=64)
    bound = DRIFT_BOUNDS[mode]
    ok, why = drift.within(bound["min_top1"], bound["max_rel"], bound["max_recall_drop"])
    assert ok or (name, mode) in KNOWN_OVER_BOUND, why


def test_what_stays_float_is_said(zoo_dir: Path) -> None:
    lstm = quantize(export_small("lstm_lm", zoo_dir), zoo_dir / "l.dyn.onnx", mode="int8-dynamic")
    assert lstm.precision["LSTM"]["int8"] == 1 and lstm.recurrent_core.startswith("LSTM: int8")
    gru = quantize(export_small("gru_attention", zoo_dir), zoo_dir / "g.dyn.onnx", mode="int8-dynamic")
    assert gru.precision["GRU"]["float32"] == 1 and "no GRU kernel" in gru.kept_float["GRU"]
    static = quantize(export_small("lstm_lm", zoo_dir), zoo_dir / "l.st.onnx", mode="int8-static",
                      calibration_streams=2, calibration_steps=32)
    assert static.precision["LSTM"]["float32"] == 1 and "no recurrent ops" in static.recurrent_core


def test_mode_that_cannot_touch_the_model_is_an_error(rt_gru_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "gru.int8.onnx"
    with pytest.raises(QuantizationError, match="cannot quantize anything.*GRU"):
        quantize(rt_gru_path, out, mode="int8-dynamic")
    assert not out.exists()
    result = CliRunner().invoke(app, ["quantize", str(rt_gru_path), "-o", str(out), "--mode", "int8-dynamic"])
    assert result.exit_code == 2 and result.output.startswith("error: ") and not out.exists()


def test_stateful_calibration_reader_feeds_the_float_models_states(zoo_dir: Path) -> None:
    src = export_small("lstm_lm", zoo_dir)
    spec = read_spec(src)
    data = task_streams(spec, batch=2, length=20, seed=3)
    assert data.kind == "text"
    reader = StatefulCalibrationReader(src, data, chunk=4)
    feeds = list(reader)
    assert len(feeds) == 5 and reader.calls == 5
    assert np.all(feeds[0]["h"] == 0)  # a fresh stream starts from the spec's initial state
    runner = OnnxRunner(src)
    states = spec.initial_states(2)
    for i, feed in enumerate(feeds):
        for s in spec.states:  # each call is fed exactly the state that streaming produced
            np.testing.assert_array_equal(feed[s.name], states[s.name])
        if i:
            assert np.abs(feed["h"]).max() > 0 and np.abs(feed["c"]).max() > 0
        _, states = runner.step({"tokens": feed["tokens"]}, states)
    assert all(v > 0 for v in reader.state_max_abs.values())


def test_held_out_text_fills_a_long_stream(zoo_dir: Path) -> None:
    """The shipped held-out split (~1.7 KB) is read again from the start for a 2048-step drift stream."""
    spec = read_spec(export_small("lstm_lm", zoo_dir))
    data = task_streams(spec, batch=2, length=2048, split="val")
    assert data.inputs["tokens"].shape == (2, 2048) and data.targets.shape == (2, 2048)
    np.testing.assert_array_equal(data.targets[:, :-1], data.inputs["tokens"][:, 1:])
    assert "held-out" in data.source and "times over" in data.source


def test_static_with_npz_calibration_and_entropy(zoo_dir: Path, tmp_path: Path) -> None:
    src = export_small("gru_attention", zoo_dir)
    npz = tmp_path / "calib.npz"
    np.savez(npz, tokens=np.random.default_rng(0).integers(0, 33, size=(2, 48)).astype(np.int64))
    report = quantize(src, tmp_path / "g.st.onnx", mode="int8-static", calibration=npz, method="entropy",
                      calibration_chunk=16)
    assert report.calibration["source"] == str(npz) and report.calibration["calls"] == 3
    assert report.calibration["state_max_abs"]["memory"] > 0  # the attention memory was calibrated filled
    assert report.options["method"] == "entropy"


def test_fp16_without_io_types_declares_float16_boundary(zoo_dir: Path) -> None:
    out = zoo_dir / "sw.fp16io.onnx"
    quantize(export_small("stacked_lstm", zoo_dir), out, mode="fp16", keep_io_types=False)
    spec = read_spec(out)
    assert {s.dtype for s in spec.states} == {"float16"} and spec.inputs[0].dtype == "float16"
    stream = wmdeploy.load(out).stream()
    y = stream.step(features=np.zeros((1, 2, 16), np.float16))["prediction"]
    assert y.dtype == np.float16


def test_quantized_file_shows_lineage_in_inspect(zoo_dir: Path, tmp_path: Path) -> None:
    src = export_small("lstm_lm", zoo_dir)
    out = tmp_path / "l.onnx"
    result = CliRunner().invoke(app, ["quantize", str(src), "-o", str(out), "--mode", "int8-dynamic"])
    assert result.exit_code == 0, result.output
    info = json.loads(CliRunner().invoke(app, ["inspect", str(out), "--json"]).output)
    assert info["lineage"][-1]["options"]["mode"] == "int8-dynamic"
    assert "wmdeploy.lineage" not in info["metadata"]
    text = CliRunner().invoke(app, ["inspect", str(out)]).output
    assert "lineage 1: quantize" in " ".join(text.split())
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize(out, tmp_path / "again.onnx", mode="fp16")


# ---- the trained recall model keeps its recall ---------------------------------------------------

#: the issue's requirement: recall accuracy after quantization within 2 points of float
RECALL_TOLERANCE = 0.02
#: 16 streams x 512 tokens (~1200 queries, ~0.15 s per model). Float and quantized models are scored
#: on the same episodes, so the sampling noise is that of their *difference*: over 20 seeds it was
#: -0.22 +- 0.26 points (int8-static, worst -0.66) and 0.00 +- 0.19 (int8-dynamic, worst -0.33), so
#: 2 points is >6 standard deviations from what the fixed models do, while the broken int8-static
#: (a -1e9 mask fill quantized with the attention scores) scored 0.15 against 0.70: a 55-point drop.
RECALL_EVAL = {"streams": 16, "length": 512, "chunk": 4, "seed": 1234}


@pytest.fixture(scope="module")
def trained_recall(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wmdeploy.exporter import export_module
    from wmdeploy.models.zoo import ZOO

    entry = ZOO["gru_attention"]
    assert entry.checkpoint_path is not None and entry.checkpoint_path.is_file(), "the recall checkpoint ships in the zoo"
    path = tmp_path_factory.mktemp("q_recall") / "gru_attention_recall.onnx"
    export_module(entry.target, path, checkpoint=entry.checkpoint_path, verify=False)
    return path


@pytest.mark.parametrize("mode", ["int8-static", "int8-dynamic"])
def test_trained_recall_model_keeps_its_recall(trained_recall: Path, tmp_path: Path, mode: str) -> None:
    from wmdeploy.models.tasks import evaluate_recall_onnx

    out = tmp_path / f"recall.{mode}.onnx"
    report = quantize(trained_recall, out, mode=mode)
    ref = evaluate_recall_onnx(trained_recall, **RECALL_EVAL)["accuracy"]
    got = evaluate_recall_onnx(out, **RECALL_EVAL)["accuracy"]
    assert ref > 0.6, f"float recall {ref:.3f}: the checkpoint is not the trained one (chance is 1/16)"
    assert got >= ref - RECALL_TOLERANCE, f"{mode}: recall accuracy {got:.4f} against float {ref:.4f}"
    if mode == "int8-static":
        assert_state_path_float(out)
        assert any("sentinel" in why for why in report.float_tensors.values()), report.float_tensors
        assert read_lineage(out)[-1]["kept_float_tensors"] == report.float_tensors
        assert report.calibration["chunk"] == 1  # calibrated as deployed: token by token


def test_quantize_refuses_a_file_that_breaks_recall(trained_recall: Path, tmp_path: Path) -> None:
    """Without the sentinel rule ORT quantizes the masked attention scores over [-1e9, 0] and recall
    collapses (0.70 -> 0.15): quantize's task check turns that into an error and leaves no file."""
    out = tmp_path / "broken.onnx"
    with pytest.raises(QuantizationError, match=r"breaks the model's task: recall accuracy .* points below"):
        quantize(trained_recall, out, mode="int8-static", float_policy=("state",))
    assert not out.exists()


def test_bad_calibration_settings_are_named_not_blamed_on_onnx_runtime(rt_lstm_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    for kw, flag in (({"calibration_steps": 0}, "--calibration-steps 0"),
                     ({"calibration_streams": 0}, "--calibration-streams 0"),
                     ({"calibration_chunk": 0}, "--calibration-chunk 0")):
        with pytest.raises(QuantizationError, match=flag):
            quantize(rt_lstm_path, out, mode="int8-static", calibration="random", **kw)
    result = CliRunner().invoke(app, ["quantize", str(rt_lstm_path), "-o", str(out), "--mode", "int8-static",
                                      "--calibration", str(tmp_path / "nosuch.npz")])
    assert result.exit_code == 2 and "nosuch.npz" in result.output, result.output
    assert "ONNX Runtime's tools" not in result.output and not out.exists()
