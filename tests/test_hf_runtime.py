"""An exported Hugging Face LM in the streaming runtime: per-stream positions, the context bound, KV caches
written in place, snapshots, and the export's refusals — on a tiny Qwen3 folder the tests save themselves."""
from __future__ import annotations

import json
from typing import Any
import numpy as np
import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402
import transformers  # noqa: E402

import wmdeploy  # noqa: E402
from wmdeploy import snapshot  # noqa: E402
from wmdeploy.contract import StreamingSpec  # noqa: E402
from wmdeploy.errors import ContextLengthError, ExportError, InputError, SnapshotError  # noqa: E402

from ._hf_folders import VOCAB, save_folder  # noqa: E402

CAPACITY = 32


def _qwen3_config() -> transformers.Qwen3Config:
    return transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    max_position_embeddings=256)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_folder(_qwen3_config(), tmp_path_factory.mktemp("hf") / "qwen3")


@pytest.fixture(scope="module")
def exported(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "qwen3.onnx"
    result = wmdeploy.export(f"hf:{folder}", out, max_context=CAPACITY)
    return result


@pytest.fixture(scope="module")
def reference(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = np.random.default_rng(1).integers(0, VOCAB, (4, CAPACITY + 4))
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    return ids, logits


def _tok(a) -> dict:
    return {"tokens": np.ascontiguousarray(np.atleast_2d(a), dtype=np.int64)}


def test_the_spec_says_what_the_memory_is(exported):
    spec = exported.spec
    assert exported.report.ok, exported.report.summary()
    assert spec.meta["max_context"] == CAPACITY and spec.meta["position_state"] == "position"
    assert spec.meta["hf"]["model_type"] == "qwen3" and spec.meta["hf"]["attention"] == "gqa"
    assert [s.name for s in spec.states] == ["position"] + [f"past_key_values.{i}.{kv}" for i in range(2)
                                                           for kv in ("key", "value")]
    kv = [s for s in spec.states if s.name.startswith("past_key_values")]
    assert all(s.shape == ("batch", 2, CAPACITY, 16) and s.inplace for s in kv)
    # 2 layers x (K + V) x 2 kv heads x 32 positions x 16 dims x 4 bytes, plus the int64 position
    assert spec.state_bytes_per_stream == 2 * 2 * 2 * CAPACITY * 16 * 4 + 8
    assert spec.input("tokens").index_bound == VOCAB
    assert spec.meta["vocab"]["kind"] == "hf" and spec.meta["vocab"]["eos_token_ids"]


def test_streams_joined_at_different_times_step_together_exactly(exported, reference):
    ids, ref = reference
    model = wmdeploy.load(exported.path)
    pool = model.pool()
    a = pool.join()
    pool.step({a: _tok(ids[0, :9])})
    b = pool.join()
    pool.step({b: _tok(ids[1, :4])})
    c = pool.join()
    got = {a: [], b: [], c: []}
    pos = {a: 9, b: 4, c: 0}
    rows = {a: 0, b: 1, c: 2}
    for _ in range(6):  # one engine call, three rows at three positions
        outs = pool.step({sid: _tok(ids[rows[sid], pos[sid]:pos[sid] + 1]) for sid in (a, b, c)})
        for sid in (a, b, c):
            np.testing.assert_allclose(outs[sid]["logits"][0, 0], ref[rows[sid], pos[sid]], atol=2e-3, rtol=0)
            pos[sid] += 1
    assert [pool.position(s) for s in (a, b, c)] == [15, 10, 6]


def test_a_gathered_subset_of_the_pool_steps_exactly(exported, reference):
    """Streams 0 and 2 of 3 step (slots not contiguous: the gather path, one scratch buffer in place)."""
    ids, ref = reference
    pool = wmdeploy.load(exported.path).pool()
    sids = [pool.join() for _ in range(3)]
    for i, sid in enumerate(sids):
        pool.step({sid: _tok(ids[i, :3 + i])})
    outs = pool.step({sids[0]: _tok(ids[0, 3:4]), sids[2]: _tok(ids[2, 5:6])})
    np.testing.assert_allclose(outs[sids[0]]["logits"][0, 0], ref[0, 3], atol=2e-3, rtol=0)
    np.testing.assert_allclose(outs[sids[2]]["logits"][0, 0], ref[2, 5], atol=2e-3, rtol=0)
    out = pool.step({sids[1]: _tok(ids[1, 4:5])})  # the one left out is where it was
    np.testing.assert_allclose(out[sids[1]]["logits"][0, 0], ref[1, 4], atol=2e-3, rtol=0)


def test_a_step_past_the_capacity_is_refused_and_nothing_moves(exported, reference):
    ids, ref = reference
    model = wmdeploy.load(exported.path)
    s = model.stream()
    s.step(**_tok(ids[0, :CAPACITY - 2]))
    with pytest.raises(ContextLengthError, match=rf"{CAPACITY - 2} tokens held \+ 3 new would pass the context capacity of {CAPACITY}"):
        s.step(**_tok(ids[0, CAPACITY - 2:CAPACITY + 1]))
    assert s.position == CAPACITY - 2
    last = s.step(**_tok(ids[0, CAPACITY - 2:CAPACITY]))["logits"][0]  # exactly up to the capacity is fine
    np.testing.assert_allclose(last, ref[0, CAPACITY - 2:CAPACITY], atol=2e-3, rtol=0)
    with pytest.raises(ContextLengthError):
        s.step(**_tok([7]))
    s.reset()
    assert s.position == 0
    np.testing.assert_allclose(s.step(**_tok(ids[0, :2]))["logits"][0], ref[0, :2], atol=2e-3, rtol=0)


def test_in_a_pool_the_whole_step_is_refused(exported, reference):
    ids, ref = reference
    pool = wmdeploy.load(exported.path).pool()
    full, fresh = pool.join(), pool.join()
    pool.step({full: _tok(ids[0, :CAPACITY])})
    with pytest.raises(ContextLengthError, match=f"stream {full}: {CAPACITY} tokens held"):
        pool.step({fresh: _tok(ids[1, :1]), full: _tok([3])})
    assert pool.position(fresh) == 0 and pool.position(full) == CAPACITY
    out = pool.step({fresh: _tok(ids[1, :1])})  # the fresh stream did not move
    np.testing.assert_allclose(out[fresh]["logits"][0, 0], ref[1, 0], atol=2e-3, rtol=0)


def test_token_ids_outside_the_vocabulary_are_refused(exported):
    s = wmdeploy.load(exported.path).stream()
    with pytest.raises(InputError, match="tokens"):
        s.step(**_tok([VOCAB]))
    with pytest.raises(InputError, match="tokens"):
        s.step(**_tok([-1]))
    assert s.position == 0


def test_a_snapshot_carries_cache_and_position_and_resumes_bit_for_bit(exported, reference):
    ids, _ = reference
    model = wmdeploy.load(exported.path)
    s = model.stream()
    s.step(**_tok(ids[2, :11]))
    blob = s.snapshot()
    expect = [s.step(**_tok(ids[2, 11 + i:12 + i]))["logits"] for i in range(4)]
    resumed = model.stream(snapshot=blob)
    assert resumed.position == 11
    pool = model.pool()
    pool.join()
    sid = pool.join(blob)  # into a pool slot too
    assert pool.position(sid) == 11
    for i in range(4):
        assert np.array_equal(resumed.step(**_tok(ids[2, 11 + i:12 + i]))["logits"], expect[i])
        assert np.array_equal(pool.step({sid: _tok(ids[2, 11 + i:12 + i])})[sid]["logits"], expect[i])
    # the KV caches are stored up to the position only: 11 of 32 rows (the size follows the context)
    kv = sum(st.bytes_per_stream for st in model.spec.states if st.inplace)
    assert len(blob) < 0.4 * kv and len(model.stream().snapshot()) < 2000
    assert len(pool.snapshot(sid)) > len(blob)  # 15 rows now


def test_a_trimmed_snapshot_is_checked_like_any_other(exported, reference):
    ids, _ = reference
    model = wmdeploy.load(exported.path)
    s = model.stream()
    s.step(**_tok(ids[0, :5]))
    header, _ = snapshot.read_header(s.snapshot())
    kv = [e for e in header["states"] if "axis" in e]
    assert kv and all(e["axis"] == 2 and e["extent"] == CAPACITY and e["shape"][2] == 5 for e in kv)
    data = model.spec.to_dict()  # the same layout without meta.context_axes: it does not allow trimming
    data["meta"] = {k: v for k, v in data["meta"].items() if k != "context_axes"}
    other = StreamingSpec.from_dict(data)
    assert other.layout_hash() == model.spec.layout_hash()
    with pytest.raises(SnapshotError, match="trimmed on axis 2"):
        snapshot.loads(other, s.snapshot())


def _rechecksummed(blob: bytes, edit: Any) -> bytes:
    """``blob`` with ``edit(header)`` applied and a valid checksum again (anyone can re-checksum: it is no MAC)."""
    import hashlib  # noqa: PLC0415

    header, block = snapshot.read_header(blob)
    edit(header)
    raw = json.dumps(header).encode()
    body = snapshot._PREFIX.pack(snapshot.MAGIC, snapshot.VERSION, 0, len(raw)) + raw + bytes(block)
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize("edit", [lambda h: h["states"][1].update(axis=2.0),
                                  lambda h: h["states"][1].update(axis=[2]),
                                  lambda h: h["states"][1].update(extent=float(CAPACITY) + 0.5),
                                  lambda h: h["states"].insert(0, {**h["states"][0], "offset": 0})],
                         ids=["float-axis", "list-axis", "float-extent", "a-state-twice"])
def test_a_damaged_trimmed_snapshot_is_one_snapshot_error(exported, reference, edit):
    """Axis/extent entries that are not ints, and a state listed twice (which entry would the pool's tier choice and
    the load each read?), are refused as SnapshotError by every reader, before anything is allocated."""
    ids, _ = reference
    model = wmdeploy.load(exported.path)
    s = model.stream()
    s.step(**_tok(ids[0, :5]))
    bad = _rechecksummed(s.snapshot(), edit)
    with pytest.raises(SnapshotError, match="snapshot: "):
        model.stream(snapshot=bad)
    pool = model.pool(tiers=[8])
    with pytest.raises(SnapshotError, match="snapshot: "):
        pool.join(bad)
    assert len(pool) == 0


def test_the_portable_form_gives_the_same_numbers_and_ping_pongs(folder, exported, tmp_path, reference):
    ids, ref = reference
    result = wmdeploy.export_hf(folder, tmp_path / "portable.onnx", max_context=CAPACITY, attention="portable")
    assert result.report.ok and not any(s.inplace for s in result.spec.states)
    assert result.spec.layout_hash() == exported.spec.layout_hash()  # snapshots move between the two forms
    gqa = wmdeploy.load(exported.path).stream()
    gqa.step(**_tok(ids[3, :6]))
    moved = wmdeploy.load(result.path).stream(snapshot=gqa.snapshot())
    np.testing.assert_allclose(moved.step(**_tok(ids[3, 6:8]))["logits"][0], ref[3, 6:8], atol=2e-3, rtol=0)


def test_the_file_carries_the_tokenizer_and_template(exported):
    meta = wmdeploy.load(exported.path).backend.file_metadata()
    tok = json.loads(meta["wmdeploy.tokenizer"])
    assert tok["model"]["type"] == "BPE"
    assert "<|im_start|>" in meta["wmdeploy.chat_template"]


def test_inspect_shows_the_bound_and_the_in_place_states(exported):
    info = wmdeploy.inspect_model(exported.path)
    assert info["context"]["max_context"] == CAPACITY
    assert info["context"]["in_place_bytes_per_stream"] == 2 * 2 * 2 * CAPACITY * 16 * 4
    assert info["metadata"]["wmdeploy.tokenizer"].startswith("<")  # summarised, not dumped


# ---- what export refuses -------------------------------------------------------------------------------

def test_a_folder_without_config_json(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no config.json"):
        wmdeploy.export(f"hf:{tmp_path / 'empty'}", tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_a_model_that_is_not_a_causal_lm(tmp_path):
    transformers.ViTConfig().save_pretrained(str(tmp_path / "vit"))
    with pytest.raises(ExportError, match="model_type 'vit'.*not a causal language model"):
        wmdeploy.export_hf(tmp_path / "vit", tmp_path / "x.onnx")
    cfg = transformers.BertConfig(architectures=["BertForSequenceClassification"])
    cfg.save_pretrained(str(tmp_path / "bert"))
    with pytest.raises(ExportError, match="BertForSequenceClassification is not a causal LM head"):
        wmdeploy.export_hf(tmp_path / "bert", tmp_path / "x.onnx")


def test_a_max_context_beyond_the_config(folder, tmp_path):
    with pytest.raises(ExportError, match="at most 256 positions"):
        wmdeploy.export_hf(folder, tmp_path / "x.onnx", max_context=4096)
    with pytest.raises(ExportError, match="--attention 'flash'"):
        wmdeploy.export_hf(folder, tmp_path / "x.onnx", attention="flash")


def test_the_cli_exports_and_says_what_it_wrote(folder, tmp_path):
    from typer.testing import CliRunner  # noqa: PLC0415

    from wmdeploy.cli import app  # noqa: PLC0415

    out = tmp_path / "cli.onnx"
    res = CliRunner().invoke(app, ["export", f"hf:{folder}", "-o", str(out), "--max-context", "16"])
    assert res.exit_code == 0, res.output
    assert "max context 16 tokens" in res.output and "verified: qwen3" in res.output
    res = CliRunner().invoke(app, ["export", f"hf:{tmp_path}", "-o", str(out)])
    assert res.exit_code == 2 and "no config.json" in res.output


def test_multi_token_steps_of_streams_with_a_past_are_exact(exported, reference):
    """ORT's GroupQueryAttention refuses several rows of several tokens with a past: the pool and a
    lock-step Stream split such steps into one row per call (meta.prefill_batch = fresh); fresh rows batch."""
    ids, ref = reference
    model = wmdeploy.load(exported.path)
    assert exported.spec.meta["prefill_batch"] == "fresh"
    pool = model.pool()
    a, b, c = pool.join(), pool.join(), pool.join()
    pool.step({a: _tok(ids[0, :4])})
    pool.step({b: _tok(ids[1, :2])})
    outs = pool.step({a: _tok(ids[0, 4:7]), b: _tok(ids[1, 2:5]), c: _tok(ids[2, :3])})
    for sid, row, lo in ((a, 0, 4), (b, 1, 2), (c, 2, 0)):
        np.testing.assert_allclose(outs[sid]["logits"][0], ref[row, lo:lo + 3], atol=2e-3, rtol=0)
    s = model.stream(batch=2)
    s.step(tokens=np.ascontiguousarray(ids[:2, :5]))
    out = s.step(tokens=np.ascontiguousarray(ids[:2, 5:9]))["logits"]
    np.testing.assert_allclose(out, ref[:2, 5:9], atol=2e-3, rtol=0)
    assert s.position == 9


def test_the_server_refuses_a_step_past_the_context_with_a_400_and_keeps_serving(exported, reference):
    pytest.importorskip("fastapi")
    import concurrent.futures  # noqa: PLC0415

    from wmdeploy.serve import ServeConfig  # noqa: PLC0415

    from ._serve_server import ThreadServer  # noqa: PLC0415

    ids, ref = reference
    srv = ThreadServer(ServeConfig(exported.path, name="lm", batch_window_ms=30), wmdeploy.load(exported.path))
    try:
        with srv.client() as c:
            for sid in ("full", "ok"):
                assert c.post("/v1/sessions", json={"id": sid}).status_code == 201
            assert c.post("/v1/sessions/full/step", json={"inputs": {"tokens": ids[0:1, :CAPACITY].tolist()}}).status_code == 200

            def step(sid: str, tokens: np.ndarray) -> Any:
                with srv.client() as own:
                    return own.post(f"/v1/sessions/{sid}/step", json={"inputs": {"tokens": tokens.tolist()}})

            with concurrent.futures.ThreadPoolExecutor(2) as ex:  # both land in one batch window
                over = ex.submit(step, "full", ids[0:1, :1])
                fine = ex.submit(step, "ok", ids[1:2, :3])
                over, fine = over.result(), fine.result()
            assert over.status_code == 400 and "would pass the context capacity of 32" in over.text
            assert "'full'" in over.text
            assert fine.status_code == 200
            np.testing.assert_allclose(np.array(fine.json()["outputs"]["logits"])[0], ref[1, :3], atol=2e-3, rtol=0)
            assert c.get("/v1/sessions/full").json()["steps"] == 1  # unchanged
    finally:
        srv.stop()
