"""``--overflow sinks:K`` (StreamingLLM) against a straightforward reference written here with transformers' own
modules, as the paper describes it: keys cached *before* RoPE, at most K sinks + the most recent tokens, and at
every step all cached keys rotated again with their positions *within the cache* (the query at the last one).
Below the capacity the file equals the ``error`` file; past it, the reference; its state never grows."""
from __future__ import annotations

import sys

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

import wmdeploy  # noqa: E402
from wmdeploy.errors import ContextLengthError, ExportError  # noqa: E402

from ._hf_folders import VOCAB, save_folder  # noqa: E402

CAPACITY, SINKS = 16, 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sinks")
    cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=4096)
    folder = save_folder(cfg, root / "qwen3")
    sinks = wmdeploy.export_hf(folder, root / "sinks.onnx", max_context=CAPACITY, overflow=f"sinks:{SINKS}")
    error = wmdeploy.export_hf(folder, root / "error.onnx", max_context=CAPACITY)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return {"folder": folder, "sinks": sinks, "error": error, "hf": model}


def streaming_llm_reference(model, ids: np.ndarray, capacity: int, sinks: int) -> np.ndarray:
    """Token by token: RoPE at position 0 is the identity, so the attention function below receives the keys
    and queries before rotation; it keeps them, evicts the oldest non-sink past ``capacity + 1`` (the sinks,
    ``capacity - sinks`` recent tokens and the current one), rotates every cached key with its index in the
    cache and the query with the last index, and attends."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    modeling = sys.modules[type(model.model.layers[0].self_attn).__module__]
    rotary, apply = model.model.rotary_emb, modeling.apply_rotary_pos_emb
    cache: dict[int, tuple[list, list]] = {}

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
        keys, values = cache.setdefault(module.layer_idx, ([], []))
        keys.append(key[:, :, 0])
        values.append(value[:, :, 0])
        if len(keys) > capacity + 1:
            del keys[sinks], values[sinks]
        n = len(keys)
        k, v = torch.stack(keys, 2), torch.stack(values, 2)           # [1, kvh, n, d]
        cos, sin = rotary(k, torch.arange(n)[None])
        k = apply(k, k, cos, sin)[0]
        cos, sin = rotary(query, torch.tensor([[n - 1]]))
        q = apply(query, query, cos, sin)[0]
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scaling, dim=-1)
        return torch.matmul(probs, v).transpose(1, 2).contiguous(), None

    AttentionInterface.register("streaming_llm_reference", attend)
    AttentionMaskInterface.register("streaming_llm_reference", lambda *a, **k: None)
    before = model.config._attn_implementation
    model.config._attn_implementation = "streaming_llm_reference"
    try:
        with torch.no_grad():
            rows = [model(input_ids=torch.from_numpy(ids[None, i:i + 1]), position_ids=torch.zeros((1, 1), dtype=torch.long),
                          use_cache=False).logits[0, 0].numpy() for i in range(len(ids))]
    finally:
        model.config._attn_implementation = before
    return np.stack(rows)


def _stream(model, ids: np.ndarray, chunks: list[int] | None = None) -> np.ndarray:
    s, out, at = model.stream(), [], 0
    for n in chunks or [1] * len(ids):
        out.append(s.step(tokens=ids[None, at:at + n])["logits"][0])
        at += n
    return np.concatenate(out)


def test_the_spec_says_sinks_and_has_no_bound(files):
    spec = files["sinks"].spec
    assert files["sinks"].report.ok, files["sinks"].report.summary()
    assert spec.meta["overflow"] == f"sinks:{SINKS}" and spec.meta["sink_capacity"] == CAPACITY
    assert "max_context" not in spec.meta and "context_axes" not in spec.meta
    kv = [s for s in spec.states if s.name.startswith("past_key_values.")]
    assert kv and all(tuple(s.shape) == ("batch", 2, CAPACITY, 16) and not s.inplace for s in kv)
    from typer.testing import CliRunner

    from wmdeploy.cli import app

    shown = CliRunner().invoke(app, ["inspect", str(files["sinks"].path)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "overflow: sinks:4 (StreamingLLM: 16 slots per attention layer" in shown.output


def test_below_the_capacity_it_is_the_error_file(files):
    ids = np.random.default_rng(0).integers(0, VOCAB, CAPACITY)
    a = _stream(wmdeploy.load(files["sinks"].path), ids, [5, 3, 1, 7])
    b = _stream(wmdeploy.load(files["error"].path), ids, [5, 3, 1, 7])
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    with pytest.raises(ContextLengthError):  # where the error file stops ...
        wmdeploy.load(files["error"].path).stream().step(tokens=ids[None, :1].repeat(CAPACITY + 1, axis=1))


def test_past_the_capacity_it_is_streaming_llm(files):
    ids = np.random.default_rng(1).integers(0, VOCAB, 4 * CAPACITY)
    want = streaming_llm_reference(files["hf"], ids, CAPACITY, SINKS)
    model = wmdeploy.load(files["sinks"].path)
    one = _stream(model, ids)
    np.testing.assert_allclose(one, want, atol=2e-4, rtol=0)
    chunked = _stream(model, ids, [7, 9, 1, 20, 3, 24])  # chunks longer than the ring, across the capacity
    np.testing.assert_allclose(chunked, want, atol=2e-4, rtol=0)
    assert np.isfinite(one).all()


def test_the_state_is_constant_and_a_pool_and_snapshots_agree(files):
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, 3 * CAPACITY))
    model = wmdeploy.load(files["sinks"].path)
    alone = [_stream(model, ids[i]) for i in range(2)]
    pool = model.pool()
    a, b = pool.join(), pool.join()
    got = {a: [pool.step({a: {"tokens": ids[0, None, :10]}})[a]["logits"][0]], b: []}
    pos = {a: 10, b: 0}
    sizes = set()
    while pos[b] < ids.shape[1]:
        live = [s for s in (a, b) if pos[s] < ids.shape[1]]
        outs = pool.step({s: {"tokens": ids[0 if s == a else 1, None, pos[s]:pos[s] + 1]} for s in live})
        for s in live:
            got[s].append(outs[s]["logits"][0])
            pos[s] += 1
        sizes.add(len(pool.snapshot(a)))
    np.testing.assert_allclose(np.concatenate(got[a]), alone[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.concatenate(got[b]), alone[1], atol=1e-5, rtol=0)
    assert len(sizes) <= 2 and pool.position(b) == 3 * CAPACITY  # the digits of the step count, not the state
    s = model.stream()
    s.step(tokens=ids[0, None, :40])
    blob = s.snapshot()
    expect = s.step(tokens=ids[0, None, 40:41])["logits"]
    assert np.array_equal(model.stream(snapshot=blob).step(tokens=ids[0, None, 40:41])["logits"], expect)


def test_bad_overflow_values_and_families(files, tmp_path):
    with pytest.raises(ExportError, match="expected 'error' or 'sinks:K'"):
        wmdeploy.export_hf(files["folder"], tmp_path / "x.onnx", max_context=CAPACITY, overflow="wrap")
    with pytest.raises(ExportError, match="fewer sink tokens"):
        wmdeploy.export_hf(files["folder"], tmp_path / "x.onnx", max_context=CAPACITY, overflow=f"sinks:{CAPACITY}")
    gpt2 = save_folder(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64),
                       tmp_path / "gpt2")
    with pytest.raises(ExportError, match="model_type 'gpt2' is not supported"):
        wmdeploy.export_hf(gpt2, tmp_path / "g.onnx", max_context=CAPACITY, overflow="sinks:4")
