"""The OpenAI API of ``wmdeploy serve``, driven by the official ``openai`` client against real servers on 127.0.0.1.

A tiny Qwen3 folder (random weights, a real BPE tokenizer with a ChatML template, ``<|im_end|>`` as eos) exported
with ``export hf:``; references are transformers' own ``apply_chat_template`` + ``generate(do_sample=False)``
on the same folder. Then prompt caching across turns (a KV model and a Mamba model: the same text as from
scratch), concurrent streams batched together, replicas sharing the cache through Redis, and the client's
mistakes answered 4xx in OpenAI's error shape while the server keeps serving.
"""
from __future__ import annotations

import concurrent.futures as cf
import re
import shutil
import time

import pytest

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")
pytest.importorskip("fastapi")

import httpx  # noqa: E402
import torch  # noqa: E402

import wmdeploy  # noqa: E402
from wmdeploy.serve import ServeConfig  # noqa: E402

import _hf_folders  # noqa: E402
from _serve_server import ThreadServer  # noqa: E402

MAX_CONTEXT = 160
KEY = "sk-test-key"
QUESTIONS = ["hello world", "The working memory of a language model", "café, naïve, 東京 and emoji 🙂",
             "Numbers 0 1 2 3", "Streams at different positions", "punctuation: ; , . ?", "hello streaming runtime!",
             "emoji 🙂 and 東京", "two words", "The cache", "one step together", "naïve café"]


def _folder(root, config):
    return _hf_folders.save_folder(config, root)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    folder = _folder(root / "qwen3", _hf_folders.tiny_qwen3())
    path = root / "qwen3.onnx"
    wmdeploy.export_hf(folder, path, max_context=MAX_CONTEXT)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    return {"folder": folder, "path": path, "ref": ref, "tok": tok, "model": wmdeploy.load(path)}


@pytest.fixture(scope="module")
def server(lm):
    srv = ThreadServer(ServeConfig(lm["path"], name="tiny", api_keys=(KEY,), max_generate_tokens=64), lm["model"])
    yield srv
    srv.stop()


def _client(srv, key: str = KEY) -> "openai.OpenAI":
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _reference(lm, messages, max_tokens: int) -> str:
    """transformers: the chat template, greedy generate, decode without special tokens (stopping at eos)."""
    tok, ref = lm["tok"], lm["ref"]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                  return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = ref.generate(ids, do_sample=False, max_new_tokens=max_tokens, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _stream_text(stream) -> tuple[str, list, object]:
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    return "".join(pieces), pieces, (finish, usage)


def test_models_lists_the_served_name(server):
    models = _client(server).models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_chat_greedy_equals_transformers_plain_and_streamed(server, lm):
    client = _client(server)
    for q in QUESTIONS[:4]:
        messages = [{"role": "user", "content": q}]
        want = _reference(lm, messages, 24)
        got = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=24)
        assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
        assert got.choices[0].message.content == want, q
        assert got.choices[0].finish_reason in ("stop", "length")
        prompt = len(lm["tok"].apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"])
        assert got.usage.prompt_tokens == prompt and got.usage.total_tokens == prompt + got.usage.completion_tokens
        text, pieces, (finish, usage) = _stream_text(client.chat.completions.create(
            model="tiny", messages=messages, temperature=0, max_tokens=24, stream=True,
            stream_options={"include_usage": True}))
        assert text == want and finish == got.choices[0].finish_reason
        assert all("\ufffd" not in p for p in pieces) or "\ufffd" in want  # no half characters in a delta
        assert usage.completion_tokens == got.usage.completion_tokens


def test_a_second_turn_reuses_the_first_and_equals_the_answer_from_scratch(server, lm):
    client = _client(server)
    first = [{"role": "user", "content": "Streams at different positions step together"}]
    one = client.chat.completions.create(model="tiny", messages=first, temperature=0, max_tokens=12)
    second = first + [{"role": "assistant", "content": one.choices[0].message.content},
                      {"role": "user", "content": "and again, once more"}]
    two = client.chat.completions.create(model="tiny", messages=second, temperature=0, max_tokens=12)
    assert two.usage.prompt_tokens_details.cached_tokens >= one.usage.prompt_tokens
    assert two.choices[0].message.content == _reference(lm, second, 12)
    # the same second turn on a server with no cache: the same text, nothing cached
    fresh = ThreadServer(ServeConfig(lm["path"], name="tiny", prompt_cache_mb=0), lm["model"])
    try:
        cold = _client(fresh, "none").chat.completions.create(model="tiny", messages=second, temperature=0,
                                                             max_tokens=12)
    finally:
        fresh.stop()
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.choices[0].message.content == two.choices[0].message.content


def test_tenants_do_not_share_the_cache(lm):
    srv = ThreadServer(ServeConfig(lm["path"], name="tiny", api_keys=("key-a", "key-b")), lm["model"])
    try:
        messages = [{"role": "user", "content": "a private question"}]
        a = _client(srv, "key-a").chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=4)
        again = _client(srv, "key-a").chat.completions.create(model="tiny", messages=messages, temperature=0,
                                                              max_tokens=4)
        b = _client(srv, "key-b").chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=4)
    finally:
        srv.stop()
    assert again.usage.prompt_tokens_details.cached_tokens == a.usage.prompt_tokens
    assert b.usage.prompt_tokens_details.cached_tokens == 0 and b.choices[0].message.content == a.choices[0].message.content


def test_twelve_concurrent_streams_each_equal_their_reference_and_decode_together(server, lm):
    client = _client(server)
    before = _batch_stats(server)

    def one(q: str) -> str:
        return _stream_text(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}],
                                                           temperature=0, max_tokens=20, stream=True))[0]

    with cf.ThreadPoolExecutor(12) as pool:
        got = list(pool.map(one, QUESTIONS))
    for q, text in zip(QUESTIONS, got):
        assert text == _reference(lm, [{"role": "user", "content": q}], 20), q
    after = _batch_stats(server)
    steps, rows = after[0] - before[0], after[1] - before[1]
    assert rows / steps > 1.5, (rows, steps)  # mean sessions per engine step
    metrics = httpx.get(server.url + "/metrics", headers={"authorization": f"Bearer {KEY}"}).text
    assert re.search(r'wmdeploy_completion_tokens_total\{kind="completion"\} [1-9]', metrics)
    assert "wmdeploy_time_to_first_token_seconds_count" in metrics and "wmdeploy_inter_token_seconds_bucket" in metrics


def _two_turns(first_server, second_server, model: str, follow_up: str, max_tokens: int):
    """A first turn on one server, the whole conversation plus a follow-up on another (or the same) one."""
    first = [{"role": "user", "content": "hello world"}]
    one = _client(first_server, "x").chat.completions.create(model=model, messages=first, temperature=0,
                                                              max_tokens=max_tokens)
    second = first + [{"role": "assistant", "content": one.choices[0].message.content},
                      {"role": "user", "content": follow_up}]
    two = _client(second_server, "x").chat.completions.create(model=model, messages=second, temperature=0,
                                                               max_tokens=max_tokens)
    return one, two, second


def _batch_stats(srv) -> tuple[float, float]:
    text = httpx.get(srv.url + "/metrics", headers={"authorization": f"Bearer {KEY}"}).text
    count = float(re.search(r"^wmdeploy_batch_size_count (\S+)", text, re.M).group(1))
    total = float(re.search(r"^wmdeploy_batch_size_sum (\S+)", text, re.M).group(1))
    return count, total


def test_completions_take_text_or_token_ids_and_stop_sequences_are_cut(server, lm):
    client = _client(server)
    plain = client.completions.create(model="tiny", prompt="The working memory", temperature=0, max_tokens=16)
    assert plain.object == "text_completion" and plain.usage.completion_tokens <= 16
    ids = lm["tok"]("The working memory")["input_ids"]
    by_ids = client.completions.create(model="tiny", prompt=ids, temperature=0, max_tokens=16)
    assert by_ids.choices[0].text == plain.choices[0].text
    text = plain.choices[0].text
    if len(text) >= 4:  # a stop sequence from the middle of the greedy text: the answer ends before it
        stop = text[len(text) // 2: len(text) // 2 + 2]
        cut = client.completions.create(model="tiny", prompt="The working memory", temperature=0, max_tokens=16,
                                        stop=[stop])
        assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt="The working memory", temperature=0, max_tokens=16, stop=[stop], stream=True))
        assert streamed == cut.choices[0].text


def test_seeded_sampling_repeats(server):
    client = _client(server)
    kw = dict(model="tiny", messages=[{"role": "user", "content": "hello"}], temperature=0.9, top_p=0.9, seed=7,
              max_tokens=10)
    assert client.chat.completions.create(**kw).choices[0].message.content == \
        client.chat.completions.create(**kw).choices[0].message.content


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": "hello"}, "messages"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 2}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "word " * 200}]}, "messages"),  # longer than the context
])
def test_a_bad_field_is_a_400_in_openai_shape(server, body, param):
    payload = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **body}
    r = httpx.post(server.url + "/v1/chat/completions", json=payload, headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    # and the server goes on
    ok = _client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_auth_model_and_body_errors(server):
    with pytest.raises(openai.AuthenticationError):
        _client(server, "wrong").chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError) as err:
        _client(server).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "model_not_found"
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": [1, 99999]},
                   headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_at_capacity_a_completion_is_429(lm):
    srv = ThreadServer(ServeConfig(lm["path"], name="tiny", max_sessions=1), lm["model"])
    try:
        http = srv.client()
        assert http.post("/v1/sessions", json={"id": "holder"}).status_code in (200, 201)
        r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        http.delete("/v1/sessions/holder")
        ok = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                     "messages": [{"role": "user", "content": "x"}]})
        assert ok.status_code == 200
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def mamba(tmp_path_factory):
    """A Mamba file: constant memory, no context bound (a completion can run as long as max_tokens says)."""
    root = tmp_path_factory.mktemp("openai_mamba")
    config = transformers.MambaConfig(vocab_size=_hf_folders.VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2,
                                      intermediate_size=64, conv_kernel=4, time_step_rank=4)
    path = root / "mamba.onnx"
    wmdeploy.export_hf(_folder(root / "mamba", config), path)
    return path, wmdeploy.load(path)


def test_an_ssm_model_reuses_its_state_across_turns(mamba):
    path, model = mamba
    warm = ThreadServer(ServeConfig(path, name="m"), model)
    cold = ThreadServer(ServeConfig(path, name="m", prompt_cache_mb=0), model)
    try:
        one, two, second = _two_turns(warm, warm, "m", "again", 10)
        scratch = _client(cold, "x").chat.completions.create(model="m", messages=second, temperature=0, max_tokens=10)
    finally:
        warm.stop()
        cold.stop()
    assert two.usage.prompt_tokens_details.cached_tokens >= one.usage.prompt_tokens
    assert two.choices[0].message.content == scratch.choices[0].message.content


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed (apt-get install "
                                                                   "redis-server, as .ci/run does)")
def test_a_replica_finds_the_conversation_another_one_computed(lm, tmp_path):
    pytest.importorskip("redis")
    from _redis_server import RedisServer

    redis_srv = RedisServer(tmp_path)
    a = ThreadServer(ServeConfig(lm["path"], name="tiny", persist=redis_srv.url), lm["model"])
    b = ThreadServer(ServeConfig(lm["path"], name="tiny", persist=redis_srv.url), wmdeploy.load(lm["path"]))
    try:
        one, two, second = _two_turns(a, b, "tiny", "and on the other replica", 8)
    finally:
        a.stop()
        b.stop()
        redis_srv.kill()
    assert two.usage.prompt_tokens_details.cached_tokens >= one.usage.prompt_tokens
    assert two.choices[0].message.content == _reference(lm, second, 8)


def test_a_stream_the_client_drops_frees_its_session_at_once(mamba):
    # a million tokens: no context bound, and greedy decoding of this model never samples eos (checked below)
    srv = ThreadServer(ServeConfig(mamba[0], name="m", max_sessions=1, max_generate_tokens=10**6), mamba[1])
    try:
        client = _client(srv, "x")
        stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}],
                                                max_tokens=10**6, temperature=0, stream=True)
        next(iter(stream))  # the role chunk: the completion holds the only session slot now
        stream.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the engine drops it at its next round
            live = re.search(r"^wmdeploy_live_sessions (\S+)", httpx.get(srv.url + "/metrics").text, re.M)
            if float(live.group(1)) == 0:
                break
            time.sleep(0.05)
        assert float(live.group(1)) == 0
        # it was cancelled, not finished: no completion was answered in full
        assert "wmdeploy_completions_total{" not in httpx.get(srv.url + "/metrics").text
        again = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=2)
        assert again.choices[0].finish_reason in ("stop", "length")
    finally:
        srv.stop()


def test_a_zoo_byte_model_completes_and_refuses_chat_without_a_template(tmp_path):
    from _zoo_small import export_small

    path = export_small("lstm_lm", tmp_path)
    model = wmdeploy.load(path)
    srv = ThreadServer(ServeConfig(path, name="lstm"), model)
    try:
        client = _client(srv, "x")
        got = client.completions.create(model="lstm", prompt="The river", temperature=0, max_tokens=12)
        want = wmdeploy.generate(model, "The river", max_tokens=12, temperature=0)
        assert got.choices[0].text == want.text() and got.usage.completion_tokens == 12
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="lstm", messages=[{"role": "user", "content": "hi"}])
        assert err.value.body["code"] == "no_chat_template"
    finally:
        srv.stop()


def test_shared_cache_entries_belong_to_the_file_not_just_its_name(lm, tmp_path):
    """Two files served under one name through one --persist DIR: a copy of the same file finds the first
    server's conversation; a file with other weights (same layout) starts from scratch, never from its states."""
    other = wmdeploy.export_hf(_hf_folders.save_folder(_hf_folders.tiny_qwen3(), tmp_path / "other", seed=1),
                               tmp_path / "other.onnx", max_context=MAX_CONTEXT, verify=False).path
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(lm["path"].read_bytes())
    first = [{"role": "user", "content": "hello world"}]
    turns = {}
    for label, path in (("writer", lm["path"]), ("copy", copy), ("other", other)):
        srv = ThreadServer(ServeConfig(path, name="tiny", persist=tmp_path / "state"), wmdeploy.load(path))
        try:
            turns[label] = _client(srv, "x").chat.completions.create(model="tiny", messages=first, temperature=0,
                                                                     max_tokens=4)
        finally:
            srv.stop()
    assert turns["copy"].usage.prompt_tokens_details.cached_tokens == turns["writer"].usage.prompt_tokens
    assert turns["other"].usage.prompt_tokens_details.cached_tokens == 0
