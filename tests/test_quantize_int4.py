"""quantize --mode int4: 4-bit weights (MatMulNBits, GatherBlockQuantized) on a small Qwen3-shaped LM that the
test trains for a few seconds on the shipped corpus, exported with ``export hf:``. Real ONNX Runtime (and
OpenVINO) sessions: the file keeps its spec, tokenizer, lineage and in-place KV states, streams the same
alone and in a pool at different positions, is <= 0.25x the float file, and stays within the documented int4
drift bound on held-out text (top-1 agreement, cross-entropy change)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import wmdeploy
from wmdeploy.cli.app import app
from wmdeploy.contract import read_spec
from wmdeploy.errors import QuantizationError
from wmdeploy.transform.drift import DRIFT_BOUNDS, drift_report
from wmdeploy.transform.lineage import file_sha256, read_lineage
from wmdeploy.transform.quantizer import quantize

from _hf_folders import train_corpus_lm
from _quant_models import SMALL_ZOO, export_small

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: the trained LM: 2 layers x 128, 4 query / 2 KV heads of 32, MLP 256, the folders' BPE vocabulary (320)
LM = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 512}
TRAIN_STEPS = 300  # ~8 s on 2 cores: held-out cross-entropy ~2.4-2.6 nats per token (uniform: 5.8)


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The trained folder exported in both attention forms, and the int4 file of each (defaults)."""
    d = tmp_path_factory.mktemp("int4")
    folder = train_corpus_lm(d / "lm", TRAIN_STEPS, **LM)
    out = {"gqa": d / "lm.onnx", "portable": d / "lm_portable.onnx"}
    wmdeploy.export_hf(folder, out["gqa"], max_context=512, verify=False)
    wmdeploy.export_hf(folder, out["portable"], max_context=512, attention="portable", verify=False)
    out["gqa_int4"], out["portable_int4"] = d / "lm.int4.onnx", d / "lm_portable.int4.onnx"
    quantize(out["gqa"], out["gqa_int4"], mode="int4")
    quantize(out["portable"], out["portable_int4"], mode="int4", check_steps=0)
    return out


def test_int4_keeps_spec_tokenizer_lineage_and_in_place_states(lm: dict[str, Path]) -> None:
    import onnx

    src, dst = lm["gqa"], lm["gqa_int4"]
    assert read_spec(dst).to_dict() == read_spec(src).to_dict()
    assert any(s.inplace for s in read_spec(dst).states)
    meta_src = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    model = onnx.load(str(dst))
    meta_dst = {p.key: p.value for p in model.metadata_props}
    for key in ("wmdeploy.tokenizer", "wmdeploy.chat_template"):
        assert meta_dst[key] == meta_src[key]
    rec = read_lineage(dst)[-1]
    assert rec["transform"] == "quantize" and rec["source_sha256"] == file_sha256(src)
    assert rec["options"] == {"mode": "int4", "block_size": 32, "symmetric": True, "accuracy_level": 4, "embedding": True}
    ops = [n.op_type for n in model.graph.node]
    # every 2-D weight is 4-bit: per layer q/k/v merged into one and gate/up into one (merge_matmul), o and
    # down on their own; the head; and the embedding table
    assert ops.count("MatMulNBits") == 4 * LM["num_hidden_layers"] + 1 and "MatMul" not in ops
    assert ops.count("Split") == 2 * LM["num_hidden_layers"]
    assert ops.count("GatherBlockQuantized") == 1
    assert ops.count("GroupQueryAttention") == LM["num_hidden_layers"]  # the in-place cache, untouched
    # the graph's own ops keep their opset (ORT's quantizer would move it to 21 for the int4 table)
    assert {o.domain: o.version for o in model.opset_import}[""] == \
        {o.domain: o.version for o in onnx.load(str(src), load_external_data=False).opset_import}[""]
    assert rec["precision"]["MatMul"]["int4"] == 9 and rec["precision"]["Gather"]["int4"] == 1


def test_int4_file_is_at_most_a_quarter_of_the_float_file(lm: dict[str, Path]) -> None:
    ratio = lm["gqa_int4"].stat().st_size / lm["gqa"].stat().st_size
    assert ratio <= 0.25, ratio  # measured 0.17 (block 32, symmetric: 4.5 bits per weight with scales)


def test_int4_streams_the_same_alone_and_in_a_pool_at_different_positions(lm: dict[str, Path]) -> None:
    model = wmdeploy.load(lm["gqa_int4"])
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 300, n).astype(np.int64) for n in (5, 9, 2)]
    alone = []
    for p in prompts:
        s = model.stream()
        first = s.step(tokens=p[None])["logits"][0, -1]
        nxt = s.step(tokens=np.array([[7]], dtype=np.int64))["logits"][0, -1]
        alone.append((first, nxt))
    pool = model.pool(capacity=4)
    sids = []
    for p in prompts:  # joined one after another: each prefilled alone, then one decode step together
        sid = pool.join()
        out = pool.step({sid: {"tokens": p[None]}})
        np.testing.assert_allclose(out[sid]["logits"][0, -1], alone[len(sids)][0], rtol=1e-4, atol=1e-4)
        sids.append(sid)
    outs = pool.step({sid: {"tokens": np.array([[7]], dtype=np.int64)} for sid in sids})
    for sid, (_, nxt) in zip(sids, alone):
        np.testing.assert_allclose(outs[sid]["logits"][0, -1], nxt, rtol=1e-4, atol=1e-4)
    assert [pool.position(sid) for sid in sids] == [len(p) + 1 for p in prompts]  # each its own position
    assert int(pool.state(sids[1])["position"][0]) == len(prompts[1]) + 1  # the graph's position state too


def test_int4_drift_on_held_out_text_is_within_the_documented_bound(lm: dict[str, Path]) -> None:
    bound = DRIFT_BOUNDS["int4"]
    drift = drift_report(lm["gqa_int4"], lm["gqa"], steps=256, batch=4)
    assert drift.task == "text" and "held-out" in drift.data  # the file's own tokenizer on held-out text
    total = drift._lm_total()
    assert total["ce_ref"] < 3.5  # the model learned the text (uniform over 320 ids: 5.77 nats)
    assert drift.top1() >= 0.9, drift.summary()  # measured 0.92-0.96
    assert total["ce_cand"] - total["ce_ref"] <= bound["max_ce_increase"], drift.summary()  # measured +0.01-0.03
    assert drift.within(**bound) == (True, "")
    result = CliRunner().invoke(app, ["verify", str(lm["gqa_int4"]), "--reference", str(lm["gqa"]), "--steps", "128"])
    assert result.exit_code == 0, result.output
    assert "within the int4 bound" in result.output


def test_int4_runs_on_openvino_like_onnx_runtime(lm: dict[str, Path]) -> None:
    pytest.importorskip("openvino")
    from wmdeploy.transform.drift import ModelRunner

    # OpenVINO's ONNX frontend reads MatMulNBits and GatherBlockQuantized into compressed weights
    ov = ModelRunner(lm["portable_int4"], "openvino", precision="f32")
    same = drift_report(ov, lm["gqa_int4"], steps=64, batch=2)
    assert same.top1() >= 0.99 and same.worst_rel() < 0.02, same.summary()  # measured 1.000, rel 0.002
    against_float = drift_report(ModelRunner(lm["portable_int4"], "openvino", precision="f32"), lm["gqa"],
                                 steps=64, batch=2)
    assert against_float.top1() >= 0.9, against_float.summary()


@pytest.mark.parametrize("name", list(SMALL_ZOO))
def test_int4_on_the_zoo_says_what_stays_float(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    d = tmp_path_factory.getbasetemp() / "int4_zoo"
    d.mkdir(exist_ok=True)
    src = export_small(name, d)
    report = quantize(src, d / f"{name}.int4.onnx", mode="int4", block_size=16)
    assert report.precision["MatMul"]["int4"] >= 1
    for op in ("LSTM", "GRU"):
        if op in report.precision:
            assert report.precision[op]["float32"] >= 1
            assert f"{op}: float32 (int4 cannot apply to the ONNX LSTM/GRU/RNN ops" in report.recurrent_core
    stream = wmdeploy.load(d / f"{name}.int4.onnx").stream()
    spec = read_spec(src)
    from wmdeploy.transform.calibration import random_streams

    outs = stream.step(**random_streams(spec, 1, 3).inputs)
    assert all(np.isfinite(v).all() for v in outs.values())


def test_int4_refuses_a_file_of_recurrent_ops_only(rt_gru_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "gru.int4.onnx"
    with pytest.raises(QuantizationError, match="int4 cannot quantize anything.*GRU \\(int4 cannot apply to the ONNX"):
        quantize(rt_gru_path, out, mode="int4")
    assert not out.exists()


@pytest.mark.parametrize("flags, says", [(["--block-size", "48"], "--block-size 48: expected a power of two"),
                                         (["--accuracy-level", "7"], "--accuracy-level 7: expected one of")])
def test_bad_int4_options_are_one_line(lm: dict[str, Path], tmp_path: Path, flags: list[str], says: str) -> None:
    out = tmp_path / "x.onnx"
    result = CliRunner().invoke(app, ["quantize", str(lm["gqa"]), "-o", str(out), "--mode", "int4", *flags])
    assert result.exit_code == 2 and says in result.output and not out.exists()
    assert len(result.output.strip().splitlines()) == 1
