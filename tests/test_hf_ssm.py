"""The SSM families through ``export_hf``: Mamba, FalconMamba, Mamba2 and the Mamba2-mixer hybrids Bamba and
GraniteMoeHybrid (both attention forms) — verified against transformers (streamed alone with prefill chunks of
7, 3+4 and 1, in a pool at different positions, greedy equal to ``generate``), their states as the configs say,
snapshots that resume bit for bit, and the explicit scans against the plain recurrence."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402
import transformers  # noqa: E402

import wmdeploy  # noqa: E402
from wmdeploy.hf import export_hf  # noqa: E402

from ._hf_folders import VOCAB, save_folder  # noqa: E402

CAPACITY = 64


def _mamba() -> transformers.MambaConfig:
    return transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=16, num_hidden_layers=2,
                                    intermediate_size=64, conv_kernel=4, time_step_rank=8)


def _falcon_mamba() -> transformers.FalconMambaConfig:
    return transformers.FalconMambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=16, num_hidden_layers=2,
                                          intermediate_size=64, conv_kernel=4, time_step_rank=8)


def _mamba2() -> transformers.Mamba2Config:
    # chunk_size 8 < the check's 12-token sequences: transformers' reference runs its multi-chunk SSD path
    return transformers.Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_heads=4, head_dim=16, expand=2, n_groups=2,
                                     state_size=16, num_hidden_layers=2, conv_kernel=4, chunk_size=8)


def _bamba() -> transformers.BambaConfig:
    return transformers.BambaConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=64, num_hidden_layers=2, attn_layer_indices=[1],
                                    mamba_n_heads=8, mamba_d_head=16, mamba_expand=2, mamba_d_state=16,
                                    mamba_n_groups=2, mamba_d_conv=4, mamba_chunk_size=8)


def _granitemoehybrid() -> transformers.GraniteMoeHybridConfig:
    return transformers.GraniteMoeHybridConfig(
        vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], mamba_n_heads=8, mamba_d_head=16,
        mamba_expand=2, mamba_d_state=16, mamba_n_groups=1, mamba_d_conv=4, mamba_chunk_size=8,
        num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=64)


def _shapes(spec) -> dict[str, list]:
    return {s.name: list(s.shape) for s in spec.states}


def _assert_verified(result, family: str, attention: str = "gqa") -> None:
    report = result.report
    assert report.ok, report.summary()
    assert report.max_diff_alone <= 2e-3 and report.max_diff_pool <= 2e-3, report.summary()
    assert report.greedy_equal and len(report.greedy_file) == 8, report.summary()
    meta = result.spec.meta
    assert meta["hf"]["model_type"] == family and meta["hf"]["attention"] == attention
    assert meta["position_state"] == "position"
    if any(s.name.startswith("past_key_values") for s in result.spec.states):
        assert meta["max_context"] == CAPACITY
    else:  # conv and scan states only: constant memory, no context bound
        assert "max_context" not in meta


def _tok(a) -> dict:
    return {"tokens": np.ascontiguousarray(np.atleast_2d(a), dtype=np.int64)}


# ---- pure SSMs ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mamba(tmp_path_factory):
    folder = save_folder(_mamba(), tmp_path_factory.mktemp("hf") / "mamba")
    return SimpleNamespace(folder=folder, result=export_hf(folder, folder.parent / "mamba.onnx", max_context=CAPACITY))


def test_mamba_is_verified_with_its_conv_and_scan_states(mamba):
    _assert_verified(mamba.result, "mamba")
    cfg = _mamba()
    want = {"position": ["batch"]}
    for i in range(2):  # Mamba's conv state keeps the whole kernel width; the scan state is [channels, state]
        want[f"past_conv.{i}"] = ["batch", cfg.intermediate_size, cfg.conv_kernel]
        want[f"past_recurrent.{i}"] = ["batch", cfg.intermediate_size, cfg.state_size]
    assert _shapes(mamba.result.spec) == want
    assert not any(s.inplace for s in mamba.result.spec.states)
    assert {s.name: s.output for s in mamba.result.spec.states}["past_recurrent.1"] == "present_recurrent.1"


def test_a_mamba_snapshot_resumes_bit_for_bit(mamba):
    ids = np.random.default_rng(3).integers(0, VOCAB, (1, 20))
    model = wmdeploy.load(mamba.result.path)
    s = model.stream()
    s.step(**_tok(ids[0, :6]))
    s.step(**_tok(ids[0, 6:9]))  # a prefill, then a chunk continuing from the held state
    blob = s.snapshot()
    expect = [s.step(**_tok(ids[0, 9 + i:10 + i]))["logits"] for i in range(4)]
    expect.append(s.step(**_tok(ids[0, 13:18]))["logits"])
    resumed = model.stream(snapshot=blob)
    assert resumed.position == 9
    got = [resumed.step(**_tok(ids[0, 9 + i:10 + i]))["logits"] for i in range(4)]
    got.append(resumed.step(**_tok(ids[0, 13:18]))["logits"])
    for a, b in zip(got, expect):
        assert np.array_equal(a, b)
    pool = model.pool()
    pool.join()
    sid = pool.join(blob)  # into a pool slot beside another stream
    assert pool.position(sid) == 9
    for i in range(4):
        out = pool.step({sid: _tok(ids[0, 9 + i:10 + i])})[sid]["logits"]
        np.testing.assert_allclose(out, expect[i], atol=1e-5, rtol=0)


def test_falcon_mamba_is_verified(tmp_path):
    folder = save_folder(_falcon_mamba(), tmp_path / "falcon_mamba")
    result = export_hf(folder, tmp_path / "falcon_mamba.onnx", max_context=CAPACITY)
    _assert_verified(result, "falcon_mamba")
    cfg = _falcon_mamba()
    shapes = _shapes(result.spec)
    assert shapes["past_conv.1"] == ["batch", cfg.intermediate_size, cfg.conv_kernel]
    assert shapes["past_recurrent.1"] == ["batch", cfg.intermediate_size, cfg.state_size]
    assert len(shapes) == 5


def test_mamba2_is_verified_and_a_long_prefill_matches_transformers_chunked_scan(tmp_path):
    folder = save_folder(_mamba2(), tmp_path / "mamba2")
    result = export_hf(folder, tmp_path / "mamba2.onnx", max_context=CAPACITY)
    _assert_verified(result, "mamba2")
    cfg = _mamba2()
    conv_dim = cfg.expand * cfg.hidden_size + 2 * cfg.n_groups * cfg.state_size
    want = {"position": ["batch"]}
    for i in range(2):  # the scan state is per head: [heads, head_dim, state]
        want[f"past_conv.{i}"] = ["batch", conv_dim, cfg.conv_kernel]
        want[f"past_recurrent.{i}"] = ["batch", cfg.num_heads, cfg.head_dim, cfg.state_size]
    assert _shapes(result.spec) == want
    # one 37-token chunk (transformers splits it into chunks of 8 and carries the state between them), then steps
    ids = np.random.default_rng(5).integers(0, VOCAB, (1, 40))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids)).logits.numpy()[0]
    s = wmdeploy.load(result.path).stream()
    got = [s.step(**_tok(ids[0, :37]))["logits"][0]] + [s.step(**_tok(ids[0, i:i + 1]))["logits"][0]
                                                        for i in range(37, 40)]
    np.testing.assert_allclose(np.concatenate(got), ref, atol=2e-3, rtol=0)


# ---- hybrids: Mamba2 mixers and attention layers, both attention forms --------------------------------------
def _assert_hybrid_states(result, conv_dim: int, heads: int, head_dim: int, state: int, kernel: int,
                          attention: str) -> None:
    shapes = _shapes(result.spec)
    assert shapes == {"position": ["batch"],
                      "past_conv.0": ["batch", conv_dim, kernel],
                      "past_recurrent.0": ["batch", heads, head_dim, state],
                      "past_key_values.1.key": ["batch", 2, CAPACITY, 16],
                      "past_key_values.1.value": ["batch", 2, CAPACITY, 16]}
    inplace = {s.name for s in result.spec.states if s.inplace}
    assert inplace == ({"past_key_values.1.key", "past_key_values.1.value"} if attention == "gqa" else set())


@pytest.fixture(scope="module")
def bamba_folder(tmp_path_factory):
    return save_folder(_bamba(), tmp_path_factory.mktemp("hf") / "bamba")


@pytest.fixture(scope="module")
def granite_folder(tmp_path_factory):
    return save_folder(_granitemoehybrid(), tmp_path_factory.mktemp("hf") / "granitemoehybrid")


@pytest.mark.parametrize("attention", ["gqa", "portable"])
def test_bamba_is_verified_in_both_attention_forms(bamba_folder, tmp_path, attention):
    result = export_hf(bamba_folder, tmp_path / f"bamba_{attention}.onnx", max_context=CAPACITY, attention=attention)
    _assert_verified(result, "bamba", attention)
    cfg = _bamba()
    inner = cfg.mamba_expand * cfg.hidden_size
    _assert_hybrid_states(result, inner + 2 * cfg.mamba_n_groups * cfg.mamba_d_state, cfg.mamba_n_heads,
                          cfg.mamba_d_head, cfg.mamba_d_state, cfg.mamba_d_conv, attention)


@pytest.mark.parametrize("attention", ["gqa", "portable"])
def test_granitemoehybrid_is_verified_in_both_attention_forms(granite_folder, tmp_path, attention):
    result = export_hf(granite_folder, tmp_path / f"granite_{attention}.onnx", max_context=CAPACITY,
                       attention=attention)
    _assert_verified(result, "granitemoehybrid", attention)
    cfg = _granitemoehybrid()
    inner = cfg.mamba_expand * cfg.hidden_size
    _assert_hybrid_states(result, inner + 2 * cfg.mamba_n_groups * cfg.mamba_d_state, cfg.mamba_n_heads,
                          cfg.mamba_d_head, cfg.mamba_d_state, cfg.mamba_d_conv, attention)


# ---- the kernels themselves -----------------------------------------------------------------------------------
class _Cache:
    """What the explicit scans read and write: one layer's held recurrent state and the recorded next one."""

    def __init__(self, state: torch.Tensor) -> None:
        self.state, self.out = state, None

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor:
        return self.state

    def update_recurrent_state(self, state: torch.Tensor, layer_idx: int, state_idx: int = 0) -> torch.Tensor:
        self.out = state
        return state


def test_the_explicit_mamba_scan_is_the_recurrence_even_with_large_decays():
    from wmdeploy.hf.ssm import explicit_mamba_scan

    g = torch.Generator().manual_seed(0)
    d, n, t = 6, 4, 9
    # |dt * A| in the thousands: a difference of running sums would lose the short-range decays here
    module = SimpleNamespace(layer_idx=0, A_log=torch.rand(d, n, generator=g) * 8,
                             dt_proj=SimpleNamespace(bias=torch.randn(d, generator=g)), D=torch.randn(d, generator=g))
    x, ts, gate = (torch.randn(2, d, t, generator=g) * 3 for _ in range(3))
    B, C = torch.randn(2, t, n, generator=g), torch.randn(2, t, n, generator=g)
    h = torch.randn(2, d, n, generator=g)
    cache = _Cache(h.clone())
    y = explicit_mamba_scan(module, x, ts, B, C, gate, cache)
    A = -torch.exp(module.A_log)
    dt = torch.nn.functional.softplus(ts + module.dt_proj.bias[:, None])
    want = []
    for i in range(t):
        h = torch.exp(dt[:, :, i, None] * A) * h + dt[:, :, i, None] * B[:, None, i] * x[:, :, i, None]
        want.append((h * C[:, None, i]).sum(-1) + module.D * x[:, :, i])
    want = torch.stack(want, -1) * torch.nn.functional.silu(gate)
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache.out, h, atol=1e-4, rtol=1e-4)


def test_the_explicit_mamba2_scan_is_the_recurrence():
    from wmdeploy.hf.ssm import explicit_mamba2_scan

    g = torch.Generator().manual_seed(1)
    heads, p, groups, n, t = 4, 3, 2, 5, 7
    module = SimpleNamespace(layer_idx=0, num_heads=heads, head_dim=p, n_groups=groups, ssm_state_size=n,
                             A_log=torch.rand(heads, generator=g) * 3, dt_bias=torch.randn(heads, generator=g),
                             D=torch.randn(heads, generator=g), time_step_limit=(0.0, float("inf")))
    x = torch.randn(2, t, heads * p, generator=g)
    B, C = torch.randn(2, t, groups * n, generator=g), torch.randn(2, t, groups * n, generator=g)
    dt = torch.randn(2, t, heads, generator=g) * 2
    h = torch.randn(2, heads, p, n, generator=g)
    cache = _Cache(h.clone())
    y = explicit_mamba2_scan(module, x, B, C, dt, cache)
    A = -torch.exp(module.A_log)
    step = torch.nn.functional.softplus(dt + module.dt_bias)
    xs = x.view(2, t, heads, p)
    Bh = B.view(2, t, groups, n).repeat_interleave(heads // groups, dim=2)
    Ch = C.view(2, t, groups, n).repeat_interleave(heads // groups, dim=2)
    want = []
    for i in range(t):
        h = torch.exp(step[:, i, :, None, None] * A[:, None, None]) * h \
            + step[:, i, :, None, None] * xs[:, i, :, :, None] * Bh[:, i, :, None, :]
        want.append((h * Ch[:, i, :, None, :]).sum(-1) + module.D[:, None] * xs[:, i])
    want = torch.stack(want, 1).reshape(2, t, heads * p)
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache.out, h, atol=1e-4, rtol=1e-4)
