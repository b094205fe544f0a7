"""A Hugging Face file alone generates text: its embedded tokenizer and chat template, against transformers.

One tiny Qwen3 folder (``_hf_folders.save_folder``: random weights, a real byte-level BPE tokenizer with
``<|im_end|>`` as eos, a ChatML template) exported with ``max_context=128``; then encode/decode/template
parity with ``AutoTokenizer``, greedy generation equal to ``model.generate``, chat turns that prefill only the
new tokens, the CLI and the server's generation WebSocket.
"""
from __future__ import annotations

import io
import json
import random

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

import torch  # noqa: E402

import wmdeploy  # noqa: E402
import _hf_folders  # noqa: E402
from wmdeploy.errors import ContextLengthError  # noqa: E402
from wmdeploy.text import ChatTemplate, HFTokenizer  # noqa: E402

MAX_CONTEXT = 128
TEXTS = ["hello world", "café, naïve, 東京 and emoji 🙂", "🙂🙂東京é", "  two  spaces\n\nand lines",
         "<|im_start|>user\nhi<|im_end|>\n", "Numbers 0 1 2 3 ; ( ) [ ] { }", ""]
EOS_PROMPTS = ["東京 Numbers", "東京 assistant", "world \n", "hello world", "The working memory"]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_text")
    folder = _hf_folders.save_folder(_hf_folders.tiny_qwen3(), root / "folder")
    path = root / "lm.onnx"
    wmdeploy.export_hf(folder, path, max_context=MAX_CONTEXT)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    return {"folder": folder, "path": path, "model": wmdeploy.load(path), "tok": tok}


@pytest.fixture(scope="module")
def ref_model(hf):
    return transformers.AutoModelForCausalLM.from_pretrained(str(hf["folder"]), dtype=torch.float32).eval()


def _ours(hf) -> HFTokenizer:
    model = hf["model"]
    return HFTokenizer.from_metadata(model.backend.file_metadata(), model.spec.meta["vocab"], 320)


def test_the_file_carries_tokenizer_and_template(hf):
    meta = hf["model"].backend.file_metadata()
    assert meta["wmdeploy.tokenizer"] and meta["wmdeploy.chat_template"] == _hf_folders.CHATML
    vocab = hf["model"].spec.meta["vocab"]
    assert vocab["kind"] == "hf" and vocab["eos_token_ids"] == [hf["tok"].convert_tokens_to_ids("<|im_end|>")]


def test_encode_and_decode_equal_transformers(hf):
    ours, tok = _ours(hf), hf["tok"]
    for text in TEXTS:
        assert ours.encode(text) == tok(text).input_ids, text
        assert ours.encode(text, add_special_tokens=False) == tok(text, add_special_tokens=False).input_ids, text
        ids = tok(text).input_ids
        assert ours.decode(ids) == tok.decode(ids, skip_special_tokens=True) == text.replace(
            "<|im_start|>", "").replace("<|im_end|>", "")
        assert ours.decode(ids, skip_special_tokens=False) == tok.decode(ids)


def test_incremental_pieces_never_split_a_character_and_join_to_decode(hf):
    ours, tok = _ours(hf), hf["tok"]
    for text in TEXTS:
        ids = tok(text).input_ids
        decode = ours.decoder()
        pieces = [decode(i) for i in ids]
        pieces.append(decode.flush())
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True), text
        assert not any("\ufffd" in p for p in pieces), pieces  # every piece is whole characters
    ids = tok("🙂").input_ids
    assert len(ids) > 1  # byte-level BPE: the emoji's four bytes over several tokens, held back until whole
    decode = ours.decoder()
    assert [decode(i) for i in ids] == [""] * (len(ids) - 1) + ["🙂"]
    rng = random.Random(0)  # arbitrary ids (a random model's output): broken bytes come out as decode shows them
    for _ in range(20):
        ids = [rng.randrange(320) for _ in range(rng.randrange(1, 60))]
        decode = ours.decoder()
        joined = "".join(decode(i) for i in ids) + decode.flush()
        assert joined == tok.decode(ids, skip_special_tokens=True)


CONVERSATIONS = [
    [{"role": "user", "content": "東京 🙂?"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "café"},
     {"role": "assistant", "content": "é"}, {"role": "user", "content": "and 🙂"}],
]

#: a template with what Hub templates use: namespace, loop controls, tojson, raise_exception, bos_token
TRICKY = ("{{ bos_token }}{% set ns = namespace(n=0) %}{% for m in messages %}{% if m['role'] == 'tool' %}"
          "{{ raise_exception('no tools here') }}{% endif %}{% if loop.index > 9 %}{% break %}{% endif %}"
          "{% set ns.n = ns.n + 1 %}\n  {{ m['role'] | upper }}: {{ m['content'] | tojson }}\n{% endfor %}"
          "{% generation %}[{{ ns.n }}]{% endgeneration %}{% if add_generation_prompt %}{{ eos_token }}{% endif %}")


def test_chat_template_renders_as_apply_chat_template(hf):
    ours, tok = _ours(hf), hf["tok"]
    for messages in CONVERSATIONS:
        text = ours.chat_template.render(messages, add_generation_prompt=True)
        assert text == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.encode(text, add_special_tokens=False) == \
            tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert ours.chat_template.render(messages, add_generation_prompt=False) == \
            tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    tricky = ChatTemplate(TRICKY, ours.special_tokens)
    for messages in CONVERSATIONS:
        assert tricky.render(messages) == tok.apply_chat_template(messages, chat_template=TRICKY,
                                                                  add_generation_prompt=True, tokenize=False)
    with pytest.raises(wmdeploy.InputError, match="no tools here"):
        tricky.render([{"role": "tool", "content": "x"}])


def test_greedy_generation_equals_transformers_generate_and_stops_at_eos(hf, ref_model):
    tok, eos = hf["tok"], hf["model"].spec.meta["vocab"]["eos_token_ids"][0]
    reasons = []
    for prompt in EOS_PROMPTS:
        run = wmdeploy.generate(hf["model"], prompt, temperature=0, max_tokens=30)
        text = run.text()
        ids = torch.tensor([tok(prompt).input_ids])
        with torch.no_grad():
            ref = ref_model.generate(ids, do_sample=False, max_new_tokens=30, eos_token_id=eos,
                                     pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        assert run.tokens == ref, prompt
        assert text == tok.decode(ref, skip_special_tokens=True)
        assert run.finish_reason == ("stop" if ref[-1] == eos else "length")
        reasons.append(run.finish_reason)
    assert "stop" in reasons  # at least one reply ended at eos, with nothing of it in the text


def test_a_prompt_past_the_context_is_refused_and_a_reply_stops_at_the_capacity(hf):
    stream = hf["model"].stream()
    with pytest.raises(ContextLengthError, match=f"capacity of {MAX_CONTEXT} tokens"):
        list(wmdeploy.generate(stream, "hello " * 200, max_tokens=3))
    assert stream.position == 0  # nothing ran
    run = wmdeploy.generate(stream, "hello " * 40, temperature=0, max_tokens=500)
    run.text()
    assert stream.position == min(MAX_CONTEXT, run.stats.prompt_tokens + len(run.tokens))
    if run.finish_reason == "length":
        assert stream.position == MAX_CONTEXT
    with pytest.raises(ContextLengthError, match="already held"):
        list(wmdeploy.generate(stream, "hello " * 100, max_tokens=1))


def _chat(hf, lines, **kw):
    from wmdeploy.conversation import chat  # noqa: PLC0415

    turns: list[dict] = []
    out = io.StringIO()
    stream = chat(hf["model"], lines, out, prompt="", turns=turns, **kw)
    return stream, turns, out.getvalue()


def _expected_new(tok, held: list[int], messages: list[dict]) -> int:
    """What the turn must prefill, computed with transformers: the rendered ids after the held ones (or, where
    the model's own tokens cut the same text differently, the rest of the text tokenized)."""
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False).input_ids
    if ids[:len(held)] == held:
        return len(ids) - len(held)
    seen = tok.decode(held)
    assert text.startswith(seen)
    return len(tok(text[len(seen):], add_special_tokens=False).input_ids)


def test_chat_second_turn_prefills_only_the_new_tokens(hf):
    tok = hf["tok"]
    first, second = "hello 東京", "and café 🙂?"
    # an empty reply: the held ids are the rendered first turn, token for token
    stream, turns, _ = _chat(hf, [first, second], max_tokens=0)
    one = tok.apply_chat_template([{"role": "user", "content": first}], add_generation_prompt=True,
                                  return_dict=True)["input_ids"]
    two = tok.apply_chat_template([{"role": "user", "content": first}, {"role": "assistant", "content": ""},
                                   {"role": "user", "content": second}], add_generation_prompt=True,
                                  return_dict=True)["input_ids"]
    assert two[:len(one)] == one
    assert [t["prefilled"] for t in turns] == [len(one), len(two) - len(one)]
    assert len(two) - len(one) == 31  # <|im_end|> \n <|im_start|> u s e r \n (the message) <|im_end|> \n <|im_start|> a ss ... \n
    assert stream.position == len(two) and not any(t["reset"] for t in turns)

    # real replies: the second turn reads the end of the first reply's message and the new user message only
    stream, turns, out = _chat(hf, [first, second], max_tokens=6)
    replies = out.splitlines()
    held = one + turns[0]["tokens"]
    messages = [{"role": "user", "content": first}, {"role": "assistant", "content": replies[0]},
                {"role": "user", "content": second}]
    assert turns[0]["prefilled"] == len(one)
    assert turns[1]["prefilled"] == _expected_new(tok, held, messages)
    assert stream.position == len(held) + turns[1]["prefilled"] + len(turns[1]["tokens"])
    assert not any(t["reset"] for t in turns)


def test_chat_save_load_and_reset_keep_the_conversation(hf, tmp_path):
    tok = hf["tok"]
    snap = tmp_path / "chat.snap"
    stream, turns, out = _chat(hf, ["hello", f"/save {snap}", "/reset", f"/load {snap}", "more", "/reset", "x"],
                               max_tokens=0)
    assert "(loaded" in out and "2 messages" in out and "(memory reset)" in out
    one = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                  return_dict=True)["input_ids"]
    two = tok.apply_chat_template([{"role": "user", "content": "hello"}, {"role": "assistant", "content": ""},
                                   {"role": "user", "content": "more"}], add_generation_prompt=True,
                                  return_dict=True)["input_ids"]
    x = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                return_dict=True)["input_ids"]
    # after /load the conversation continues (only the new tokens); after /reset it starts over
    assert [t["prefilled"] for t in turns] == [len(one), len(two) - len(one), len(x)]
    assert stream.position == len(x) and not any(t["reset"] for t in turns)
    # a snapshot without the conversation (a plain Stream.snapshot): its memory is kept, the next turn appended
    plain = tmp_path / "plain.snap"
    s = hf["model"].stream()
    wmdeploy.generate(s, "hello", max_tokens=2, temperature=0).text()
    plain.write_bytes(s.snapshot())
    stream, turns, out = _chat(hf, [f"/load {plain}", "x"], max_tokens=0)
    assert "continue its memory" in out
    assert turns[0]["prefilled"] == len(x) and stream.position == s.position + len(x)


def test_cli_generate_and_chat_on_an_hf_file(hf):
    from typer.testing import CliRunner  # noqa: PLC0415

    from wmdeploy.cli.app import app  # noqa: PLC0415

    runner = CliRunner()
    library = wmdeploy.generate(hf["model"], "東京 Numbers", temperature=0, max_tokens=30).text()
    result = runner.invoke(app, ["generate", str(hf["path"]), "--prompt", "東京 Numbers", "--temperature", "0",
                                 "--max-tokens", "30", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["text"] == library and report["finish_reason"] == "stop"
    result = runner.invoke(app, ["generate", str(hf["path"]), "--prompt", "hello " * 200])
    assert result.exit_code == 2 and f"context capacity of {MAX_CONTEXT} tokens" in result.output
    result = runner.invoke(app, ["chat", str(hf["path"]), "--max-tokens", "4"], input="hello\n/reset\nhi\n")
    assert result.exit_code == 0, result.output
    assert "(memory reset)" in result.output


def test_websocket_generation_of_an_hf_file(hf):
    websockets_sync = pytest.importorskip("websockets.sync.client")
    from _serve_server import ThreadServer, ws_generate  # noqa: PLC0415
    from wmdeploy.serve import ServeConfig  # noqa: PLC0415

    srv = ThreadServer(ServeConfig(hf["path"], name="hf", batch_window_ms=1), hf["model"])
    try:
        with srv.client() as c:
            assert c.post("/v1/sessions", json={"id": "h1"}).status_code == 201
        local = hf["model"].stream()
        first = wmdeploy.generate(local, "東京 Numbers", temperature=0, max_tokens=30)
        second = wmdeploy.generate(local, " hello", temperature=0, max_tokens=5)
        with websockets_sync.connect(srv.url.replace("http", "ws") + "/v1/sessions/h1/generate") as ws:
            a = ws_generate(ws, prompt="東京 Numbers", temperature=0, max_tokens=30)
            b = ws_generate(ws, prompt=" hello", temperature=0, max_tokens=5)
            big = ws_generate(ws, prompt="hello " * 200, max_tokens=3)  # past the context: the client's error
            c = ws_generate(ws, prompt=" x", temperature=0, max_tokens=2)  # and the session goes on
        assert "".join(m.get("text", "") for m in a) == first.text()
        assert a[-1]["tokens"] == first.tokens and a[-1]["finish_reason"] == first.finish_reason == "stop"
        assert "".join(m.get("text", "") for m in b) == second.text() and b[-1]["tokens"] == second.tokens
        assert len(big) == 1 and f"context capacity of {MAX_CONTEXT} tokens" in big[0]["error"]
        assert "already held" in big[0]["error"] and "done" in c[-1]
        with srv.client() as client:
            metrics = client.get("/metrics").text
        assert 'kind="invalid_input"' in metrics and 'kind="internal"' not in metrics
    finally:
        srv.stop()


def test_chat_memory_cut_differently_is_extended_and_a_diverging_one_is_reset(hf):
    """The memory holds the model's own tokens: "hello" as five one-letter tokens, where the tokenizer cuts
    it as one. The next turn reads the rest of the rendered text only; a conversation that does not extend
    the memory's text (an edited history) resets the memory and re-reads it whole, said once."""
    import numpy as np  # noqa: PLC0415

    from wmdeploy.conversation import _Conversation  # noqa: PLC0415
    from wmdeploy.generation import language_model_info  # noqa: PLC0415

    tok, model = hf["tok"], hf["model"]
    info = language_model_info(model.spec, "lm", model)
    conversation = _Conversation(info.tokenizer)
    user = [{"role": "user", "content": "hi"}]
    one = tok.apply_chat_template(user, add_generation_prompt=True, return_dict=True)["input_ids"]
    letters = tok.convert_tokens_to_ids(list("hello"))
    assert tok("hello", add_special_tokens=False).input_ids != letters
    stream = model.stream()
    stream.step(tokens=np.array([one + letters], dtype=np.int64))
    conversation.held, conversation.messages = one + letters, [*user, {"role": "assistant", "content": "hello"}]
    out = io.StringIO()
    ids, messages, reset = conversation.new_ids(stream, "more", out)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert not reset and out.getvalue() == "" and stream.position == len(one) + 5
    assert ids == tok(text[len(tok.decode(one + letters)):], add_special_tokens=False).input_ids
    assert tok.decode(one + letters + ids) == text
    conversation.messages = [*user, {"role": "assistant", "content": "bye"}]  # not what the memory holds
    ids, messages, reset = conversation.new_ids(stream, "more", out)
    assert reset and stream.position == 0 and "memory is reset" in out.getvalue()
    assert ids == tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    conversation.held = [5]  # a memory that is not what it should be, again: reset, not said twice
    assert conversation.new_ids(stream, "again", out)[2]
    assert out.getvalue().count("memory is reset") == 1
