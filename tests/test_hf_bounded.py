"""A working memory with a bound: sliding-window layers are rings of their window (a Mistral-style model
streams forever in a constant state, exactly as transformers), and a capacity-long cache refuses the step
that would pass it with every stream as it was."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402
import transformers  # noqa: E402

import wmdeploy  # noqa: E402
from wmdeploy.errors import ContextLengthError  # noqa: E402

from ._hf_folders import VOCAB, save_folder  # noqa: E402

WINDOW = 8


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     max_position_embeddings=4096, sliding_window=WINDOW)
    return save_folder(cfg, tmp_path_factory.mktemp("bounded") / "mistral")


@pytest.mark.parametrize("form", ["gqa", "portable"])
def test_a_sliding_window_model_streams_past_max_context_in_a_constant_state(mistral, tmp_path, form):
    result = wmdeploy.export_hf(mistral, tmp_path / "m.onnx", max_context=32, attention=form)
    spec = result.spec
    assert result.report.ok, result.report.summary()
    assert "max_context" not in spec.meta  # nothing grows: no bound
    kv = [s for s in spec.states if s.name.startswith("past_key_values.")]
    assert all(s.shape == ("batch", 2, WINDOW - 1, 16) and not s.inplace for s in kv)
    # 2 layers x K+V x 2 kv heads x 7 ring slots x 16 x 4 bytes + the position
    assert spec.state_bytes_per_stream == 2 * 2 * 2 * (WINDOW - 1) * 16 * 4 + 8
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(mistral), dtype=torch.float32).eval()
    prompt = torch.tensor([[5, 7, 9, 11]])
    with torch.no_grad():
        want = hf.generate(prompt, do_sample=False, max_new_tokens=200, min_new_tokens=200, eos_token_id=None,
                           pad_token_id=0)[0, 4:].tolist()
    stream = wmdeploy.load(result.path).stream()
    logits = stream.step(tokens=prompt.numpy())["logits"][0, -1]
    got, sizes = [], set()
    for i in range(200):  # 204 tokens through a 32-token --max-context: the ring never fills up
        token = int(np.argmax(logits))
        got.append(token)
        logits = stream.step(tokens=np.array([[token]], np.int64))["logits"][0, -1]
        if i % 50 == 0:
            sizes.add(tuple((k, v.shape) for k, v in stream.state.items()))
    assert got == want
    assert stream.position == 204 and len(sizes) == 1  # the state does not grow


def test_a_chunk_longer_than_the_ring_is_exact(mistral, tmp_path):
    """Prefill chunks longer than the window: the chunk reads the ring as it was, then keeps its last keys."""
    result = wmdeploy.export_hf(mistral, tmp_path / "m.onnx", max_context=32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(mistral), dtype=torch.float32).eval()
    ids = np.random.default_rng(3).integers(0, VOCAB, (1, 60))
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids)).logits[0].numpy()
    stream = wmdeploy.load(result.path).stream()
    got, pos = [], 0
    for n in (20, 3, 11, 1, 25):
        got.append(stream.step(tokens=np.ascontiguousarray(ids[:, pos:pos + n]))["logits"][0])
        pos += n
    np.testing.assert_allclose(np.concatenate(got), ref, atol=2e-3, rtol=0)


def test_at_the_capacity_the_memory_is_untouched(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    result = wmdeploy.export_hf(save_folder(cfg, tmp_path / "llama"), tmp_path / "l.onnx", max_context=16)
    model = wmdeploy.load(result.path)
    s = model.stream()
    s.step(tokens=np.arange(15, dtype=np.int64)[None])
    before = s.snapshot()
    with pytest.raises(ContextLengthError, match="15 tokens held \\+ 2 new would pass the context capacity of 16"):
        s.step(tokens=np.array([[1, 2]], np.int64))
    assert s.snapshot() == before
    pool = model.pool()
    a, b = pool.join(before), pool.join()
    snaps = [pool.snapshot(a), pool.snapshot(b)]
    with pytest.raises(ContextLengthError, match=f"stream {a}: 15 tokens held"):
        pool.step({b: {"tokens": np.array([[3]], np.int64)}, a: {"tokens": np.array([[1, 2]], np.int64)}})
    assert [pool.snapshot(a), pool.snapshot(b)] == snaps
