"""Decoder files made by other exporters, adopted with no flags (``wmdeploy annotate FILE -o OUT``).

Fixtures are made by the real tools, once per module: small random-init Hugging Face folders (Qwen3, Llama, LFM2:
2 layers, hidden 64, head size 16 — ONNX Runtime's CPU ``GroupQueryAttention`` needs multiples of 16) run through
ONNX Runtime GenAI's own builder in a subprocess (fp32; Qwen3 also int4), and GenAI's own ``og.Generator`` (in a
subprocess: it ships its own ONNX Runtime) gives the greedy tokens each adopted file must reproduce.

The growing-cache (Optimum-layout) file: Optimum does not install beside our pins (it needs transformers < 4.58),
so it is made here by ``torch.onnx.export`` of the transformers model itself, in a thin wrapper whose only job
is to reproduce Optimum's interface exactly — the input/output names and dynamic axes of optimum's
``exporters/onnx/config.py`` (``TextDecoderOnnxConfig``) and ``base.py`` (``add_past_key_values``), with
``position_ids`` as its llama/qwen configs in ``model_configs.py`` add: ``input_ids [batch_size,
sequence_length]``, ``attention_mask [batch_size, past_sequence_length + sequence_length]``, ``position_ids``,
``past_key_values.{i}.key|value [batch_size, kv_heads, past_sequence_length, head]`` -> ``logits``,
``present.{i}.key|value [.., past_sequence_length + sequence_length, ..]``. Its reference is transformers'
``generate``.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime_genai")
onnx = pytest.importorskip("onnx")
pytest.importorskip("tokenizers")

import torch  # noqa: E402

import wmdeploy  # noqa: E402
import _hf_folders  # noqa: E402
from wmdeploy.errors import SpecError  # noqa: E402
from wmdeploy.text import HFTokenizer  # noqa: E402

PROMPT = [5, 17, 40, 3, 9, 100, 31]
NEW = 16
TEXT = "café, naïve, 東京"
GENAI = {"qwen3-fp32": ("qwen3", "fp32"), "qwen3-int4": ("qwen3", "int4"), "llama-fp32": ("llama", "fp32"),
         "lfm2-fp32": ("lfm2", "fp32")}

_OG = """
import json, sys
import onnxruntime_genai as og
jobs, out = json.loads(sys.argv[1]), {}
for key, (folder, prompts) in jobs.items():
    model = og.Model(folder)
    out[key] = []
    for ids in prompts:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + %d, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens([ids])
        while not gen.is_done():
            gen.generate_next_token()
        out[key].append([int(t) for t in gen.get_sequence(0)][len(ids):])
print(json.dumps(out))
""" % NEW


def _configs() -> dict:
    c = _hf_folders
    return {
        "qwen3": c.tiny_qwen3(),
        "llama": transformers.LlamaConfig(vocab_size=c.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          max_position_embeddings=512),
        "lfm2": transformers.Lfm2Config(vocab_size=c.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                        layer_types=["conv", "full_attention"], conv_L_cache=3, block_multiple_of=16),
    }


class _OptimumLayout(torch.nn.Module):
    """transformers' model behind Optimum's interface (see the module doc): the cache goes in as tensors and
    comes out grown by the chunk."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.layers = model, model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = transformers.DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=True)
        layers = out.past_key_values.layers
        return (out.logits, *[t for layer in layers[:self.layers] for t in (layer.keys, layer.values)])


def _optimum_file(folder: Path, out: Path) -> Path:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    cfg, n = model.config, model.config.num_hidden_layers
    b, t, p = 2, 3, 4  # traced with a past and no size-1 axis, as Optimum's dummy inputs are
    past = [torch.randn(b, cfg.num_key_value_heads, p, cfg.head_dim) for _ in range(2 * n)]
    kv_in = [f"past_key_values.{i}.{k}" for i in range(n) for k in ("key", "value")]
    kv_out = [f"present.{i}.{k}" for i in range(n) for k in ("key", "value")]
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"}, "logits": {0: "batch_size", 1: "sequence_length"},
            **{k: {0: "batch_size", 2: "past_sequence_length"} for k in kv_in},
            **{k: {0: "batch_size", 2: "past_sequence_length + sequence_length"} for k in kv_out}}
    out.mkdir(parents=True)
    args = (torch.randint(0, cfg.vocab_size, (b, t)), torch.ones(b, p + t, dtype=torch.int64),
            torch.arange(p, p + t).expand(b, t), *past)
    with torch.no_grad():
        torch.onnx.export(_OptimumLayout(model), args, str(out / "model.onnx"), input_names=["input_ids",
                          "attention_mask", "position_ids", *kv_in], output_names=["logits", *kv_out],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):  # what optimum-cli saves beside the model
        shutil.copy(folder / name, out / name)
    return out / "model.onnx"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("adopt")
    # seeds whose random weights give a varied greedy continuation (tiny LFM2s soon repeat one token)
    seeds = {"qwen3": 1, "llama": 3, "lfm2": 0}
    folders = {name: _hf_folders.save_folder(cfg, root / name, seed=seeds[name]) for name, cfg in _configs().items()}
    runs = {}
    for key, (name, precision) in GENAI.items():  # the builder, two at a time (each is one Python process)
        runs[key] = subprocess.Popen([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folders[name]),
                                      "-o", str(root / key), "-p", precision, "-e", "cpu", "--extra_options",
                                      "hf_token=false"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if len(runs) % 2 == 0:
            for proc in runs.values():
                proc.wait()
    for key, proc in runs.items():
        assert proc.wait() == 0, f"{key}: {proc.stdout.read().decode()[-2000:]}"
    tok = HFTokenizer((folders["qwen3"] / "tokenizer.json").read_text())
    text_ids = tok.encode(TEXT)
    jobs = {key: [str(root / key), [PROMPT, text_ids]] for key in GENAI}
    og = json.loads(subprocess.run([sys.executable, "-c", _OG, json.dumps(jobs)], check=True, capture_output=True,
                                   text=True).stdout)
    adopted = {key: root / f"{key}.onnx" for key in GENAI}
    for key, path in adopted.items():
        wmdeploy.annotate(root / key / "model.onnx", path)  # no flags
    optimum = _optimum_file(folders["qwen3"], root / "optimum-qwen3")
    adopted["optimum-qwen3"] = root / "optimum-qwen3.onnx"
    wmdeploy.annotate(optimum, adopted["optimum-qwen3"])
    return {"root": root, "folders": folders, "og": og, "adopted": adopted, "optimum": optimum, "text_ids": text_ids}


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    stream = model.stream()
    logits = stream.step(tokens=np.array([prompt]))["logits"]
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits[0, -1])))
        logits = stream.step(tokens=np.array([[out[-1]]]))["logits"]
    return out


@pytest.mark.parametrize("key", list(GENAI))
def test_a_genai_file_is_adopted_with_no_flags_and_decodes_as_genai_does(built, key):
    model = wmdeploy.load(built["adopted"][key])
    spec = model.spec
    assert spec.meta["adopted"]["convention"] == "genai" and spec.meta["max_context"] == 512
    assert [t.name for t in spec.inputs] == ["tokens"] and [t.name for t in spec.outputs] == ["logits"]
    kv = [s for s in spec.states if s.name.startswith("past_key_values.")]
    assert spec.states[0].name == "position" and kv and all(s.inplace and s.shape == ("batch", 2, 512, 16) for s in kv)
    if key.startswith("lfm2"):  # its conv layer's state: fixed size, fed back (ping-pong)
        assert [(s.name, s.inplace) for s in spec.states if "conv" in s.name] == [("past.0.conv", False)]
    assert spec.meta["vocab"]["kind"] == "hf" and spec.meta["vocab"]["eos_token_ids"] == [2]
    ours = _greedy(model, PROMPT, NEW)
    assert ours == built["og"][key][0]
    assert len(set(ours)) >= 3  # a real continuation, not one token repeated


@pytest.mark.parametrize("key", [*GENAI, "optimum-qwen3"])
def test_two_streams_at_different_positions_in_one_pool_equal_each_alone(built, key):
    model = wmdeploy.load(built["adopted"][key])
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 320, (2, 16))
    chunks = [(i, i + 1) for i in range(4)] + [(4, 6)]  # four single tokens, then two at once with a past
    alone = []
    for row, start in ((0, 7), (1, 3)):
        stream = model.stream()
        stream.step(tokens=ids[row:row + 1, :start])
        alone.append([stream.step(tokens=ids[row:row + 1, start + i:start + j])["logits"] for i, j in chunks])
    pool = model.pool()
    a, b = pool.join(), pool.join()
    pool.step({a: {"tokens": ids[0:1, :7]}, b: {"tokens": ids[1:2, :3]}})
    for k, (i, j) in enumerate(chunks):  # one step of both, rows at positions 7 + i and 3 + i
        outs = pool.step({a: {"tokens": ids[0:1, 7 + i:7 + j]}, b: {"tokens": ids[1:2, 3 + i:3 + j]}})
        np.testing.assert_allclose(outs[a]["logits"], alone[0][k], atol=1e-4, rtol=0)
        np.testing.assert_allclose(outs[b]["logits"], alone[1][k], atol=1e-4, rtol=0)
    assert (pool.position(a), pool.position(b)) == (13, 9)


def test_a_snapshot_of_an_adopted_stream_resumes_exactly(built):
    model = wmdeploy.load(built["adopted"]["qwen3-fp32"])
    stream = model.stream()
    stream.step(tokens=np.array([PROMPT]))
    blob = stream.snapshot()
    assert len(blob) < model.spec.state_bytes_per_stream // 4  # the in-place KV cache is stored up to the position
    want = stream.step(tokens=np.array([[11]]))["logits"]
    back = model.stream(blob)
    assert back.position == len(PROMPT)
    np.testing.assert_array_equal(back.step(tokens=np.array([[11]]))["logits"], want)


def test_generate_chat_and_the_openai_route_use_the_tokenizer_beside_it(built):
    from typer.testing import CliRunner  # noqa: PLC0415

    from wmdeploy.cli.app import app  # noqa: PLC0415

    path = built["adopted"]["qwen3-fp32"]
    model = wmdeploy.load(path)
    run = wmdeploy.generate(model, TEXT, temperature=0, max_tokens=NEW)
    text = run.text()
    assert run.tokens == built["og"]["qwen3-fp32"][1]  # the prompt encoded by the embedded tokenizer, as GenAI decodes
    assert len(run.tokens) >= 4 and text
    turns: list = []
    out = io.StringIO()
    wmdeploy.chat(model, ["hello"], out, max_tokens=4, turns=turns)
    rendered = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"  # the ChatML template beside it
    assert turns[0]["prefilled"] == len(HFTokenizer(model.backend.file_metadata()["wmdeploy.tokenizer"])
                                        .encode(rendered, add_special_tokens=False))
    result = CliRunner().invoke(app, ["chat", str(path), "--max-tokens", "4"], input="hello\n/reset\nhi\n")
    assert result.exit_code == 0 and "(memory reset)" in result.output, result.output

    from wmdeploy.serve import ServeConfig  # noqa: PLC0415
    from _serve_server import ThreadServer  # noqa: PLC0415

    srv = ThreadServer(ServeConfig(path, name="adopted"), model)
    try:
        with srv.client() as client:
            reply = client.post("/v1/completions", json={"model": "adopted", "prompt": TEXT, "temperature": 0,
                                                         "max_tokens": NEW})
    finally:
        srv.stop()
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == text


def test_a_growing_cache_decoder_is_adopted_with_no_flags_and_equals_transformers(built):
    model = wmdeploy.load(built["adopted"]["optimum-qwen3"])
    spec = model.spec
    assert spec.meta["adopted"]["convention"] == "optimum" and spec.meta["max_context"] == 512
    kv = [s for s in spec.states if s.name.startswith("past_key_values.")]
    assert len(kv) == 4 and all(not s.inplace and s.shape == ("batch", 2, 512, 16) for s in kv)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(built["folders"]["qwen3"]), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
                            pad_token_id=0)[0, len(PROMPT):].tolist()
    assert _greedy(model, PROMPT, NEW) == want


# ---- bad input: one line naming the tensor and the flag -----------------------------------------------------

def _edited(built, tmp_path: Path, edit, beside: bool = True) -> Path:
    """A copy of the Optimum-layout file with one thing broken (and the files beside it, unless not)."""
    proto = onnx.load(str(built["optimum"]))
    edit(proto.graph)
    folder = tmp_path / "edited"
    folder.mkdir()
    if beside:
        for f in built["optimum"].parent.glob("*.json*"):
            shutil.copy(f, folder / f.name)
    onnx.save(proto, str(folder / "model.onnx"))
    return folder / "model.onnx"


def _cli_error(path: Path, *flags: str) -> str:
    from typer.testing import CliRunner  # noqa: PLC0415

    from wmdeploy.cli.app import app  # noqa: PLC0415

    result = CliRunner().invoke(app, ["annotate", str(path), "-o", str(path.with_name("out.onnx")), *flags])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def test_an_unmatched_cache_pair_is_refused_by_name(built, tmp_path):
    def rename(graph):
        for node in graph.node:
            node.output[:] = ["stray.1.value" if o == "present.1.value" else o for o in node.output]
        next(o for o in graph.output if o.name == "present.1.value").name = "stray.1.value"
    out = _cli_error(_edited(built, tmp_path, rename))
    assert "input 'past_key_values.1.value'" in out and "--state" in out and "--convention" in out


def test_a_mask_that_is_not_past_plus_time_is_refused(built, tmp_path):
    def chunk_only(graph):
        next(i for i in graph.input if i.name == "attention_mask").type.tensor_type.shape.dim[1].dim_param = \
            "sequence_length"
    out = _cli_error(_edited(built, tmp_path, chunk_only))
    assert "input 'attention_mask'" in out and "past_sequence_length + sequence_length" in out and "--convention" in out


def test_an_unknown_context_length_needs_max_context(built, tmp_path):
    path = _edited(built, tmp_path, lambda graph: None, beside=False)
    out = _cli_error(path)
    assert "input 'past_key_values.0.key'" in out and "--max-context" in out
    spec = wmdeploy.annotate(path, tmp_path / "ok.onnx", max_context=64)
    assert spec.meta["max_context"] == 64 and spec.meta["vocab"]["kind"] == "ids"
    assert _greedy(wmdeploy.load(tmp_path / "ok.onnx"), PROMPT, 4) == _greedy(
        wmdeploy.load(built["adopted"]["optimum-qwen3"]), PROMPT, 4)


def test_a_forced_convention_that_does_not_fit_is_refused(built, tmp_path):
    from typer.testing import CliRunner  # noqa: PLC0415

    from wmdeploy.cli.app import app  # noqa: PLC0415

    result = CliRunner().invoke(app, ["annotate", str(built["optimum"]), "-o", str(tmp_path / "ok.onnx"),
                                      "--convention", "optimum", "--max-context", "32"])
    assert result.exit_code == 0 and "optimum decoder" in result.output and "max context 32" in result.output, \
        result.output
    out = _cli_error(built["optimum"], "--convention", "genai")
    assert "input 'past_key_values.0.key'" in out and "--convention optimum" in out
    with pytest.raises(SpecError, match="--convention 'mlc'"):
        wmdeploy.annotate(built["optimum"], tmp_path / "x.onnx", convention="mlc")
    with pytest.raises(SpecError, match="--max-context 4096: the files beside model.onnx allow at most 512"):
        wmdeploy.annotate(built["optimum"], tmp_path / "x.onnx", max_context=4096)
