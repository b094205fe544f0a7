"""The hybrids LFM2 (convs + attention), Qwen3-Next (gated delta net + gated attention, MoE) and
RecurrentGemma (RG-LRU + local attention) exported from tiny random-init folders the tests save themselves,
in both attention forms, each checked against transformers by the export itself (streamed alone with
prefill chunks of 7, 3 + 4 and 1, in a pool at different positions, greedy == generate()); plus the
loop-free kernels (:mod:`wmdeploy.hf.hybrid`) against plain float64 loops over time."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
import torch  # noqa: E402
import transformers  # noqa: E402

from wmdeploy.errors import ExportError  # noqa: E402
from wmdeploy.hf import export_hf  # noqa: E402
from wmdeploy.hf import hybrid  # noqa: E402
from wmdeploy.hf import layout as hf_layout  # noqa: E402

from ._hf_folders import VOCAB, save_folder  # noqa: E402

CAPACITY = 64
FORMS = ("gqa", "portable")


def _lfm2() -> transformers.Lfm2Config:
    return transformers.Lfm2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   layer_types=["conv", "full_attention", "conv"], conv_L_cache=3,
                                   block_multiple_of=16)


def _qwen3_next() -> transformers.Qwen3NextConfig:
    return transformers.Qwen3NextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, linear_conv_kernel_dim=4,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        decoder_sparse_step=1, layer_types=["linear_attention", "full_attention", "linear_attention"])


def _recurrent_gemma() -> transformers.RecurrentGemmaConfig:
    # lru_width differs from hidden_size; the window (8) is shorter than the checked sequences (12)
    return transformers.RecurrentGemmaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, lru_width=96, attention_window_size=8, conv1d_width=4,
        block_types=["recurrent", "attention", "recurrent"])


CONFIGS = {"lfm2": _lfm2, "qwen3_next": _qwen3_next, "recurrent_gemma": _recurrent_gemma}


def _expected_states(family: str, config) -> dict[str, tuple]:
    """Per-stream state shapes from the config alone (batch axis first, then the spec's shape)."""
    want: dict[str, tuple] = {"position": ()}
    if family == "lfm2":
        for i, kind in enumerate(config.layer_types):
            if kind == "conv":
                want[f"past_conv.{i}"] = (config.hidden_size, config.conv_L_cache)
            else:
                head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
                want[f"past_key_values.{i}.key"] = (config.num_key_value_heads, CAPACITY, head_dim)
                want[f"past_key_values.{i}.value"] = want[f"past_key_values.{i}.key"]
    elif family == "qwen3_next":
        conv_dim = 2 * config.linear_num_key_heads * config.linear_key_head_dim + \
            config.linear_num_value_heads * config.linear_value_head_dim
        for i, kind in enumerate(config.layer_types):
            if kind == "linear_attention":
                want[f"past_conv.{i}"] = (conv_dim, config.linear_conv_kernel_dim)
                want[f"past_recurrent.{i}"] = (config.linear_num_value_heads, config.linear_key_head_dim,
                                               config.linear_value_head_dim)
            else:
                want[f"past_key_values.{i}.key"] = (config.num_key_value_heads, CAPACITY, config.head_dim)
                want[f"past_key_values.{i}.value"] = want[f"past_key_values.{i}.key"]
    else:
        for i, kind in enumerate(config.layers_block_type):
            if kind == "linear_attention":
                want[f"past_conv.{i}"] = (config.lru_width, config.conv1d_width - 1)
                want[f"past_recurrent.{i}"] = (config.lru_width,)
            else:
                want[f"past_key_values.{i}.key"] = (config.num_key_value_heads, CAPACITY, config.head_dim)
                want[f"past_key_values.{i}.value"] = want[f"past_key_values.{i}.key"]
    return want


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_hybrid")
    return {family: save_folder(make(), root / family) for family, make in CONFIGS.items()}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", list(CONFIGS))
def test_hybrid_export_verified(family, form, folders, tmp_path):
    result = export_hf(folders[family], tmp_path / f"{family}.onnx", max_context=CAPACITY, attention=form)
    report = result.report
    assert report is not None and report.ok, report.summary()
    assert report.max_diff_alone <= 2e-3 and report.max_diff_pool <= 2e-3, report.summary()
    assert report.greedy_equal and len(report.greedy_file) == 8, report.summary()
    got = {s.name: tuple(s.shape[1:]) for s in result.spec.states}
    assert got == _expected_states(family, CONFIGS[family]())
    kinds = {s.name: s for s in result.spec.states}
    for name, state in kinds.items():
        if name.startswith("past_recurrent") or name.startswith("past_conv"):
            assert state.dtype == "float32" and not state.inplace
        elif name.startswith("past_key_values"):
            assert state.inplace == (form == "gqa")
    assert result.spec.meta["hf"]["model_type"] == family


def test_qwen3_next_several_delta_blocks_in_the_graph(folders, tmp_path, monkeypatch):
    """With blocks of 4 positions, the check's prefills (7 from 0, 3 after 4) span two blocks: the in-graph
    padding, block reshape and the scan across blocks are exercised, not only the single-block path."""
    monkeypatch.setattr(hybrid, "DELTA_BLOCK", 4)
    result = export_hf(folders["qwen3_next"], tmp_path / "q.onnx", max_context=CAPACITY, attention="portable")
    assert result.report.ok, result.report.summary()


# ---- the kernels against loops over time -----------------------------------------------------------------
def _delta_rule_loop(q, k, v, g, beta, s):
    """The gated delta rule one token at a time, in float64 (l2-normed q/k, q scaled by 1/sqrt(dk))."""
    rep = v.shape[2] // k.shape[2]
    q, k = (x.repeat_interleave(rep, 2).double() for x in (q, k))
    v, g, beta, s = v.double(), g.double(), beta.double(), s.double()
    q = q / q.norm(dim=-1, keepdim=True) * q.shape[-1] ** -0.5
    k = k / k.norm(dim=-1, keepdim=True)
    outs = []
    for i in range(q.shape[1]):
        s = s * g[:, i].exp()[..., None, None]
        delta = (v[:, i] - (s * k[:, i][..., None]).sum(-2)) * beta[:, i][..., None]
        s = s + k[:, i][..., None] * delta[..., None, :]
        outs.append((s * q[:, i][..., None]).sum(-2))
    return torch.stack(outs, 1), s


@pytest.mark.parametrize("t,rate,block,max_length", [(1, 1.0, 4, 64), (7, 1.0, 4, 64), (13, 0.1, 4, 64),
                                                      (64, 1.0, 16, 64), (300, 0.001, 16, 2048)])
def test_gated_delta_rule_matches_the_recurrence(t, rate, block, max_length):
    torch.manual_seed(t)
    b, hk, hv, dk, dv = 2, 2, 4, 16, 8
    q, k = torch.randn(b, t, hk, dk), torch.randn(b, t, hk, dk)
    v = torch.randn(b, t, hv, dv)
    g, beta = -rate * torch.rand(b, t, hv), torch.rand(b, t, hv)
    s0 = torch.randn(b, hv, dk, dv)
    want_out, want_state = _delta_rule_loop(q, k, v, g, beta, s0)
    out, state = hybrid.gated_delta_rule(q, k, v, g, beta, s0, max_length, block=block)
    assert out.shape == (b, t, hv, dv) and state.shape == (b, hv, dk, dv)
    assert float((out.double() - want_out).abs().max()) < 1e-5
    assert float((state.double() - want_state).abs().max()) < 1e-5


def test_gated_delta_rule_matches_transformers_chunked_form():
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule  # noqa: PLC0415

    torch.manual_seed(1)
    b, t, h, dk, dv = 1, 100, 2, 16, 16
    q, k, v = torch.randn(b, t, h, dk), torch.randn(b, t, h, dk), torch.randn(b, t, h, dv)
    g, beta, s0 = -torch.rand(b, t, h), torch.rand(b, t, h), torch.randn(b, h, dk, dv)
    want_out, want_state = torch_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                                        use_qk_l2norm_in_kernel=True)
    out, state = hybrid.gated_delta_rule(q, k, v, g, beta, s0, 128)
    assert float((out - want_out).abs().max()) < 1e-5 and float((state - want_state).abs().max()) < 1e-5


@pytest.mark.parametrize("t", [1, 2, 5, 64])
def test_linear_scan_matches_the_loop(t):
    torch.manual_seed(t)
    a, x = torch.rand(2, t, 8), torch.randn(2, t, 8)
    h, want = torch.zeros(2, 8), []
    for i in range(t):
        h = a[:, i] * h + x[:, i]
        want.append(h)
    got = hybrid.linear_scan(a, x, hybrid._doublings(64))
    assert float((torch.stack(want, 1) - got).abs().max()) < 1e-5


def test_prepare_hybrid_refuses_other_families():
    with pytest.raises(ExportError, match="llama"):
        hybrid.prepare_hybrid(object(), "llama", hf_layout.CacheLayout((), 0, (), ()))


def test_recurrent_gemma_probe_reads_the_module_states():
    torch.manual_seed(0)
    config = _recurrent_gemma()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    layout = hybrid.probe_recurrent_gemma(model, CAPACITY)
    assert layout.num_layers == 3 and layout.sliding == (False, True, False) and layout.linear == (True, False, True)
    assert [(t.kind, t.layer, t.shape) for t in layout.tensors] == [
        ("conv", 0, (96, 3)), ("recurrent", 0, (96,)), ("key", 1, (2, CAPACITY, 16)), ("value", 1, (2, CAPACITY, 16)),
        ("conv", 2, (96, 3)), ("recurrent", 2, (96,))]
    # the probe leaves the model's own states as a fresh model has them
    assert all(getattr(layer.temporal_block, "conv1d_state", None) is None for layer in model.model.layers)
