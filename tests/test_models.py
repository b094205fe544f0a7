"""The model zoo: every architecture exports through the generic path and streams like PyTorch.

Small configs keep each export + verification (chunks 1, 7, 32; batches 1, 3) to a second or two.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from wmdeploy.exporter import export, export_module
from wmdeploy.models.gated_memory import GatedMemoryCell, GatedMemoryLM
from wmdeploy.models.lstm_lm import PRESETS, LSTMLanguageModel
from wmdeploy.models.sliding_window import SlidingWindowTransformerLM
from wmdeploy.models.zoo import CHECKPOINT_DIR, ZOO, build, load_zoo_model

from _zoo_small import SMALL


def _states(model: torch.nn.Module, batch: int) -> list[torch.Tensor]:
    return [torch.from_numpy(s.initial(batch)) for s in model.streaming_spec().states]


def _stream_torch(model, tokens: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    states, outs, a = _states(model, tokens.shape[0]), [], 0
    with torch.no_grad():
        for c in chunks:
            r = model(tokens[:, a:a + c], *states)
            outs.append(r[0])
            states = list(r[1:])
            a += c
    return torch.cat(outs, dim=1)


def _stream_onnx(path: Path, tokens: np.ndarray, chunks: list[int]) -> np.ndarray:
    from wmdeploy.contract import read_spec

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    spec = read_spec(sess)
    states, outs, a = spec.initial_states(tokens.shape[0]), [], 0
    for c in chunks:
        logits, *nxt = sess.run(["logits"] + [s.output for s in spec.states],
                                {"tokens": tokens[:, a:a + c], **states})
        states = {s.name: v for s, v in zip(spec.states, nxt)}
        outs.append(logits)
        a += c
    return np.concatenate(outs, axis=1)


def test_zoo_covers_the_six_architectures() -> None:
    classes = {e.target.split(":")[1] for e in ZOO.values()}
    assert {"GRUAttentionLM", "LSTMLanguageModel", "StackedLSTMRegressor", "GatedMemoryLM",
            "MemoryTokenTransformer", "SlidingWindowTransformerLM"} <= classes
    assert set(SMALL) == set(ZOO)
    for name in ZOO:  # the shipped configs name a vocabulary that text generation can decode
        meta = build(name).streaming_spec().meta
        if meta.get("task") == "lm":
            assert meta["vocab"]["kind"] in ("bytes", "chars"), name


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_exports_and_verifies(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build(name, SMALL[name])
    result = export(model, tmp_path / f"{name}.onnx")  # verifies chunks 1, 7, 32 at batch 1 and 3
    assert result.report is not None and result.report.ok, result.report.summary()
    spec = result.spec
    assert spec.chunk_invariant == (name != "memory_tokens")
    for t in spec.inputs:
        if t.dtype == "int64":
            assert spec.meta["vocab_size"] == model.vocab_size
    if spec.meta.get("task") == "lm":
        assert spec.meta["tokens_input"] == "tokens" and spec.meta["logits_output"] == "logits"
        assert spec.meta["vocab"]["kind"] in ("bytes", "chars", "ids")  # "ids": a small test vocabulary
        if spec.meta["vocab"]["kind"] == "chars":
            assert len(spec.meta["vocab"]["chars"]) == spec.meta["vocab_size"]


def test_lstm_presets_and_benchmark_kwargs() -> None:
    m = LSTMLanguageModel(vocab_size=256, embed_dim=8, hidden_size=16, num_layers=2)
    assert m.streaming_spec().states[0].shape == (2, "batch", 16)
    big = LSTMLanguageModel.preset("2x1024")
    assert (big.num_layers, big.hidden_size) == (2, 1024)
    assert big.streaming_spec().state_bytes_per_stream == 2 * 2 * 1024 * 4
    assert set(PRESETS) >= {"tiny", "small", "2x1024"}
    with pytest.raises(ValueError, match="preset 'huge'"):
        LSTMLanguageModel.preset("huge")


def test_gated_memory_equals_nn_lstm() -> None:
    torch.manual_seed(1)
    lstm = torch.nn.LSTM(16, 24, num_layers=2, batch_first=True)
    lm = GatedMemoryLM(vocab_size=40, embed_dim=16, hidden_size=24, num_layers=2).load_from_lstm(lstm)
    x = torch.randn(3, 19, 16)
    h0, c0 = torch.randn(2, 3, 24), torch.randn(2, 3, 24)
    with torch.no_grad():
        want, (hw, cw) = lstm(x, (h0, c0))
        got = x
        hs, cs = [], []
        for i, cell in enumerate(lm.cells):
            got, h, c = cell(got, h0[i], c0[i])
            hs.append(h)
            cs.append(c)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.stack(hs), hw, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.stack(cs), cw, atol=1e-6, rtol=1e-5)
    # the whole LM too: same logits as embedding -> nn.LSTM -> head
    tokens = torch.randint(0, 40, (3, 11))
    with torch.no_grad():
        y, _ = lstm(lm.embed(tokens), (h0, c0))
        torch.testing.assert_close(lm(tokens, h0, c0)[0], lm.head(y), atol=1e-6, rtol=1e-5)


def test_gated_memory_cell_parameters_mirror_lstm() -> None:
    cell = GatedMemoryCell(5, 7)
    assert {n: tuple(p.shape) for n, p in cell.named_parameters()} == {
        "weight_ih": (28, 5), "weight_hh": (28, 7), "bias_ih": (28,), "bias_hh": (28,)}


def test_gated_memory_onnx_has_dynamic_time_loop(tmp_path: Path) -> None:
    import onnx

    torch.manual_seed(0)
    model = build("gated_memory", SMALL["gated_memory"])
    path = tmp_path / "gm.onnx"
    export(model, path, verify=False)
    assert "Loop" in {n.op_type for n in onnx.load(str(path)).graph.node}
    tokens = np.random.default_rng(0).integers(0, 40, (2, 45))
    ref = _stream_torch(model, torch.from_numpy(tokens), [45]).numpy()
    np.testing.assert_allclose(_stream_onnx(path, tokens, [45]), ref, atol=1e-5)  # longer than any sample


def test_sliding_window_stream_equals_full_masked_forward(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SlidingWindowTransformerLM(vocab_size=40, dim=32, heads=4, layers=2, window=12).eval()
    tokens = torch.randint(0, 40, (3, 60))
    with torch.no_grad():
        full = model.forward_full(tokens)
    chunks = [1, 7, 12, 5, 12, 3, 9, 11]
    assert sum(chunks) == 60
    torch.testing.assert_close(_stream_torch(model, tokens, chunks), full, atol=1e-5, rtol=1e-4)
    # the window matters: a wider one sees more and gives other numbers after position W
    wide = SlidingWindowTransformerLM(vocab_size=40, dim=32, heads=4, layers=2, window=48).eval()
    wide.load_state_dict(model.state_dict())
    with torch.no_grad():
        other = wide.forward_full(tokens)
    assert torch.allclose(other[:, :12], full[:, :12], atol=1e-5)
    assert not torch.allclose(other[:, 12:], full[:, 12:], atol=1e-3)
    # and from the ONNX file, one chunk length per call
    path = tmp_path / "sw.onnx"
    export(model, path, verify=False)
    np.testing.assert_allclose(_stream_onnx(path, tokens.numpy(), chunks), full.numpy(), atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(_stream_onnx(path, tokens.numpy(), [1] * 60), full.numpy(), atol=1e-4, rtol=1e-3)


def test_gru_attention_forgets_beyond_its_window() -> None:
    """With the GRU's recurrence cut (no recurrent weights, update gate shut), step t depends only on the
    last K+1 tokens: the attention memory is all the model remembers, and it forgets beyond K."""
    torch.manual_seed(0)
    H = 16
    model = build("gru_attention", {"vocab_size": 33, "hidden_size": H, "memory": 6}).eval()
    with torch.no_grad():
        model.gru.weight_hh_l0.zero_()
        model.gru.bias_hh_l0.zero_()
        model.gru.weight_ih_l0[H:2 * H].zero_()  # gates r, z, n: z = sigmoid(-1e4) = 0, so h' = n(x)
        model.gru.bias_ih_l0[H:2 * H].fill_(-1e4)
    a = torch.randint(0, 33, (1, 30))
    b = a.clone()
    b[:, 10] = (a[:, 10] + 1) % 33
    la, lb = _stream_torch(model, a, [4] * 7 + [2]), _stream_torch(model, b, [4] * 7 + [2])
    diff = (la - lb).abs().amax(dim=-1)[0]
    assert diff[10:17].min() > 0  # positions 10..16 still hold token 10 in their window (K=6 + self)
    assert diff[17:].max() == 0  # after that it has fallen out of the working memory


def test_memory_tokens_carry_information_across_segments() -> None:
    torch.manual_seed(0)
    model = build("memory_tokens", SMALL["memory_tokens"]).eval()
    a = torch.randint(0, 40, (2, 48))
    b = a.clone()
    b[:, :16] = torch.randint(0, 40, (2, 16))  # only the first segment differs
    segs = [16, 16, 16]

    def last_logits(tokens: torch.Tensor) -> torch.Tensor:
        mem = _states(model, 2)[0]
        with torch.no_grad():
            for i, s in enumerate(segs):
                logits, mem = model(tokens[:, 16 * i:16 * i + s], mem)
        return logits

    out = last_logits(a)
    assert out.shape == (2, model.n_classes)
    assert not torch.allclose(out, last_logits(b))


@pytest.mark.parametrize("name", [n for n, e in ZOO.items() if e.checkpoint])
def test_shipped_checkpoint_loads_and_is_small(name: str) -> None:
    entry = ZOO[name]
    path = entry.checkpoint_path
    assert path is not None and path.is_file()
    assert path.stat().st_size < 4_000_000
    data = torch.load(str(path), map_location="cpu", weights_only=True)
    assert set(data) >= {"state_dict", "config", "metrics"}
    assert data["config"] == entry.config  # the zoo entry describes the shipped weights
    model = load_zoo_model(name)
    assert not model.training
    metrics = json.loads((CHECKPOINT_DIR / "metrics.json").read_text())
    assert path.name in metrics


def test_export_module_takes_a_zoo_checkpoint(tmp_path: Path) -> None:
    """What `wmdeploy export wmdeploy.models.lstm_lm:LSTMLanguageModel --config ... --checkpoint ...` runs."""
    path = CHECKPOINT_DIR / "lstm_lm.pt"
    config = torch.load(str(path), map_location="cpu", weights_only=True)["config"]
    out = tmp_path / "lstm_lm.onnx"
    result = export_module("wmdeploy.models.lstm_lm:LSTMLanguageModel", out, config=json.dumps(config),
                           checkpoint=path, chunks=(1, 7), batches=(1,))
    assert result.report.ok
    # the trained model predicts the shipped text far better than uniform (8 bits per byte)
    text = np.frombuffer(b"The keeper climbed the steps of the tower and trimmed the wick.", np.uint8)
    tokens = text.astype(np.int64)[None]
    logits = _stream_onnx(out, tokens[:, :-1], [tokens.shape[1] - 1])
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1).mean() / np.log(2)
    assert nll < 4.0
