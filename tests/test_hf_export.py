"""``export_hf`` across the attention families, in both attention forms, verified against transformers.

Each family is a tiny random-init folder (2 layers, hidden 64, 4 heads, 2 kv heads where the family has
them, head size 16) that the tests save themselves; every export runs the built-in check (:mod:`wmdeploy.hf.check`:
streamed alone and in a pool at different positions vs transformers' full forward, greedy tokens vs
``generate``). Sliding-window families get windows shorter than the checked sequences, and a longer
sequence (40 tokens, window 8) is streamed here against the full forward as well. Last, the portable Qwen3
file on OpenVINO against ONNX Runtime.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402
import transformers  # noqa: E402

import wmdeploy  # noqa: E402
from wmdeploy.hf import export_hf  # noqa: E402

from ._hf_folders import VOCAB, save_folder  # noqa: E402

CAPACITY = 64
WINDOW = 4  # the sliding window of the mistral and gemma3 configs (shorter than the 12-token check)
FORMS = ("gqa", "portable")
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=128)
# no bos/eos/pad ids outside the 320-token vocabulary (the folder's generation config carries the tokenizer's)
_NO_IDS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _gpt2(window: int | None = None):
    # learned position embeddings (wpe, from position_ids); per-layer scale 1/(layer + 1) on top of 1/sqrt(d)
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=128,
                                   scale_attn_by_inverse_layer_idx=True, bos_token_id=None, eos_token_id=None)


def _llama(window=None):
    return transformers.LlamaConfig(**_COMMON, num_key_value_heads=2, head_dim=16)


def _qwen2(window=None):
    return transformers.Qwen2Config(**_COMMON, num_key_value_heads=2)


def _qwen3(window=None):
    return transformers.Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=16)


def _phi3(window=None):
    # fused qkv_proj and gate_up_proj; RoPE on half of each head
    return transformers.Phi3Config(**_COMMON, **_NO_IDS, num_key_value_heads=2, partial_rotary_factor=0.5)


def _gemma3(window=4):
    # one sliding and one global layer, each with its own RoPE base; scores scaled by query_pre_attn_scalar^-0.5
    return transformers.Gemma3TextConfig(**_COMMON, num_key_value_heads=2, head_dim=16, sliding_window=window,
                                         layer_types=["sliding_attention", "full_attention"],
                                         query_pre_attn_scalar=32, rope_theta=1e6, rope_local_base_freq=1e4,
                                         final_logit_softcapping=30.0)


def _mistral(window=4):
    return transformers.MistralConfig(**_COMMON, num_key_value_heads=2, head_dim=16, sliding_window=window)


FAMILIES = {"gpt2": (_gpt2, 4), "llama": (_llama, 2), "qwen2": (_qwen2, 2), "qwen3": (_qwen3, 2),
            "phi3": (_phi3, 2), "gemma3": (_gemma3, 2), "mistral": (_mistral, 2)}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """``build(family, window=None)`` -> the saved folder (each built once per module)."""
    root = tmp_path_factory.mktemp("hf_families")
    made: dict = {}

    def make(family: str, window: int | None = None):
        key = (family, window)
        if key not in made:
            factory = FAMILIES[family][0]
            config = factory() if window is None else factory(window)
            made[key] = save_folder(config, root / f"{family}_{window or 'default'}")
        return made[key]

    return make


@pytest.fixture(scope="module")
def exported(build, tmp_path_factory):
    """``exported(family, form, window=None)`` -> export_hf's result (each exported once per module)."""
    root = tmp_path_factory.mktemp("hf_onnx")
    made: dict = {}

    def make(family: str, form: str, window: int | None = None):
        key = (family, form, window)
        if key not in made:
            out = root / f"{family}_{window or 'default'}_{form}.onnx"
            made[key] = export_hf(build(family, window), out, max_context=CAPACITY, attention=form)
        return made[key]

    return make


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_exports_a_verified_file(exported, family, form):
    result = exported(family, form)
    report = result.report
    assert report is not None and report.ok, report.summary()
    assert report.max_diff_alone <= 2e-3 and report.max_diff_pool <= 2e-3, report.summary()
    assert report.greedy_equal, report.summary()
    spec = result.spec
    kv_heads = FAMILIES[family][1]
    # sliding-window layers (mistral: both; gemma3: the first) are rings of window - 1 positions, whatever the
    # capacity, and ping-pong; capacity-long layers are written in place under gqa
    rings = {"mistral": {0, 1}, "gemma3": {0}}.get(family, set())
    assert spec.meta.get("max_context") == (None if family == "mistral" else CAPACITY)  # mistral: unbounded
    assert spec.meta["hf"]["attention"] == form
    kv = [s for s in spec.states if s.name.startswith("past_key_values.")]
    assert [s.name for s in kv] == [f"past_key_values.{i}.{n}" for i in range(2) for n in ("key", "value")]
    for state in kv:
        layer = int(state.name.split(".")[1])
        length = WINDOW - 1 if layer in rings else CAPACITY
        assert tuple(state.shape) == ("batch", kv_heads, length, 16), (state.name, state.shape)
        assert state.inplace is (form == "gqa" and layer not in rings), (state.name, state.inplace)
    position = spec.states[0]
    assert position.name == "position" and tuple(position.shape) == ("batch",) and position.dtype == "int64"


# which GQA nodes rotate q and k themselves (hf/rotary.py): every full-attention layer of a family whose RoPE is
# transformers' half rotation over the whole head; never Phi3's (half of each head rotated); Gemma3's sliding
# layer is a ring, rotated by transformers as before
DO_ROTARY = {"llama": [True, True], "qwen2": [True, True], "qwen3": [True, True], "phi3": [False, False],
             "gemma3": [True], "gpt2": [False, False]}


@pytest.mark.parametrize("family", list(DO_ROTARY))
def test_rope_runs_inside_the_attention_node_where_it_is_transformers_rotation(exported, family):
    import onnx  # noqa: PLC0415

    result = exported(family, "gqa")
    assert result.report.ok, result.report.summary()  # the file with RoPE inside GQA agrees with transformers
    graph = onnx.load(str(result.path), load_external_data=False).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert [any(a.name == "do_rotary" and a.i for a in n.attribute) for n in gqa] == DO_ROTARY[family]
    if family in ("llama", "qwen2", "qwen3"):
        assert not [n for n in graph.node if n.op_type == "Neg"]  # no rotate_half left in the graph
        assert len({n.input[7] for n in gqa}) == 1  # one cos table for every layer (the tracer shares the tensor)
        # and every Reshape target is a constant (transform/static_shapes): no Shape arithmetic per step
        made = {o: n.op_type for n in graph.node for o in n.output}
        assert not [n for n in graph.node if n.op_type == "Reshape" and made.get(n.input[1]) not in (None, "Constant")]


def test_a_family_that_changes_rotated_q_and_k_is_exported_with_transformers_rope(build, tmp_path, monkeypatch):
    """A deferred rotation that does not reach the attention node unchanged (simulated: the attention function
    refuses the tag) re-traces with transformers rotating, and the file still agrees with transformers."""
    import onnx  # noqa: PLC0415

    from wmdeploy.hf import attention, rotary  # noqa: PLC0415

    def refuse(ctx, query, key):
        if rotary.tag_of(query) is not None:
            raise rotary.NotDeferred("simulated")
        return None

    monkeypatch.setattr(attention, "_deferred_table", refuse)
    result = export_hf(build("llama"), tmp_path / "llama.onnx", max_context=CAPACITY)
    assert result.report.ok, result.report.summary()
    gqa = [n for n in onnx.load(str(result.path)).graph.node if n.op_type == "GroupQueryAttention"]
    assert gqa and not any(a.name == "do_rotary" for n in gqa for a in n.attribute)


def _tok(a) -> dict:
    return {"tokens": np.ascontiguousarray(np.atleast_2d(a), dtype=np.int64)}


def _hf_logits(folder, ids: np.ndarray, *, no_window: bool = False) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    if no_window:  # the same weights with every window wider than the sequence: what the window changes
        model.config.sliding_window = 10 ** 6
        for module in model.modules():
            if getattr(module, "sliding_window", None):
                module.sliding_window = 10 ** 6
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.float().numpy()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_sliding_window_holds_over_a_long_sequence(build, exported, family, form):
    """40 tokens, window 8: a Stream (prefill chunks of 13 and 6, then single tokens) and a pool of two
    streams at different positions equal transformers' full forward at every position."""
    window, length = 8, 40
    folder = build(family, window)
    result = exported(family, form, window)
    assert result.report.ok, result.report.summary()
    ids = np.random.default_rng(7).integers(0, VOCAB, (2, length))
    ref = _hf_logits(folder, ids)
    # the window matters: without it transformers' own logits differ once a sequence outgrows it
    assert np.abs(_hf_logits(folder, ids, no_window=True)[:, window:] - ref[:, window:]).max() > 1e-2
    model = wmdeploy.load(result.path)
    try:
        stream = model.stream()
        got, pos = [], 0
        for n in [13, 6] + [1] * (length - 19):
            got.append(stream.step(**_tok(ids[0, pos:pos + n]))["logits"][0])
            pos += n
        assert np.abs(np.concatenate(got) - ref[0]).max() <= 2e-3
        pool = model.pool()
        a, b = pool.join(), pool.join()
        first = pool.step({a: _tok(ids[0, :11])})[a]["logits"][0]
        outs = {a: [first], b: []}
        pos = {a: 11, b: 0}
        rows = {a: 0, b: 1}
        while pos[b] < length:
            live = [s for s in (a, b) if pos[s] < length]
            step = pool.step({s: _tok(ids[rows[s], pos[s]]) for s in live})
            for s in live:
                outs[s].append(step[s]["logits"][0])
                pos[s] += 1
        for s in (a, b):
            assert np.abs(np.concatenate(outs[s]) - ref[rows[s]]).max() <= 2e-3, s
    finally:
        model.close()


def test_portable_qwen3_runs_on_openvino_like_onnxruntime(exported):
    try:
        import openvino  # noqa: F401, PLC0415
    except ImportError as exc:
        pytest.skip(f"openvino is not importable ({exc})")
    result = exported("qwen3", "portable")
    ids = np.random.default_rng(3).integers(0, VOCAB, (2, 14))

    def run(backend: str) -> list[np.ndarray]:
        model = wmdeploy.load(result.path, backend=backend)
        try:
            pool = model.pool()
            a, b = pool.join(), pool.join()
            outs = {a: [pool.step({a: _tok(ids[0, :6])})[a]["logits"][0]], b: []}
            for i in range(8):  # one call, two rows at positions 6 + i and i
                step = pool.step({a: _tok(ids[0, 6 + i]), b: _tok(ids[1, i])})
                outs[a].append(step[a]["logits"][0])
                outs[b].append(step[b]["logits"][0])
            return [np.concatenate(outs[a]), np.concatenate(outs[b])]
        finally:
            model.close()

    ov, ort = run("openvino"), run("onnxruntime")
    for x, y in zip(ov, ort):
        assert x.shape == y.shape
        assert np.abs(x - y).max() <= 2e-3
