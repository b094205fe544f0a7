"""The OpenAI routes at their edges: odd requests, damaged prompt-cache entries, a tokenizer that knows more ids
than the model. Real servers on 127.0.0.1; a client's mistake is a 4xx in OpenAI's shape, and the server goes on.
"""
from __future__ import annotations

import struct

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("fastapi")

import httpx  # noqa: E402

import wmdeploy  # noqa: E402
from wmdeploy.serve import ServeConfig  # noqa: E402

import _hf_folders  # noqa: E402
from _serve_server import ThreadServer  # noqa: E402

EXTRA = 30  # tokens the tokenizer adds beyond the model's 320 embedding rows (a fine-tune that never resized)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai_edges")
    folder = _hf_folders.save_folder(_hf_folders.tiny_qwen3(), root / "qwen3")
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok.add_tokens([f"<extra{i}>" for i in range(EXTRA)])
    tok.save_pretrained(str(folder))
    path = root / "qwen3.onnx"
    wmdeploy.export_hf(folder, path, max_context=160)
    return path, wmdeploy.load(path)


def _ok(srv) -> None:
    r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text


def test_max_completion_tokens_null_falls_back_to_max_tokens(lm):
    srv = ThreadServer(ServeConfig(lm[0], name="tiny", max_generate_tokens=64), lm[1])
    try:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=30, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": None,
            "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 3
    finally:
        srv.stop()


@pytest.mark.parametrize("prompt", ["hello <extra29> world", "<extra29>"])
def test_a_prompt_token_the_model_lacks_is_a_400_and_the_engine_goes_on(lm, prompt):
    srv = ThreadServer(ServeConfig(lm[0], name="tiny", max_generate_tokens=64), lm[1])
    try:
        for stream in (False, True):
            r = httpx.post(srv.url + "/v1/completions", timeout=30,
                           json={"model": "tiny", "prompt": prompt, "max_tokens": 3, "stream": stream})
            if stream and r.status_code == 200:  # the error after the status line: an error event
                assert '"error"' in r.text and "data: [DONE]" in r.text, r.text
            else:
                assert r.status_code == 400, r.text
                assert r.json()["error"]["type"] == "invalid_request_error"
        assert httpx.get(srv.url + "/v2/health/ready").status_code == 200
        _ok(srv)
    finally:
        srv.stop()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_damaged_prompt_cache_entry_is_a_miss_not_a_failed_request(lm, tmp_path, damage):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 4,
            "temperature": 0}
    srv = ThreadServer(ServeConfig(lm[0], name="tiny", persist=tmp_path), lm[1])
    try:
        first = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30).json()
    finally:
        srv.stop()
    files = sorted((tmp_path / "prompt-cache").rglob("*.bin"))
    assert files
    for f in files:
        blob = f.read_bytes()
        head = 9 + 4 * struct.unpack_from("<5sI", blob)[1]  # the entry's own header and logits stay readable
        snap = blob[head:]
        f.write_bytes(blob[:head] + {"garbage": b"\0garbage" * 20, "truncated": snap[:len(snap) // 2],
                                     "empty": b""}[damage])
    srv = ThreadServer(ServeConfig(lm[0], name="tiny", persist=tmp_path), lm[1])
    try:
        for _ in range(2):
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
        metrics = httpx.get(srv.url + "/metrics").text
        assert "\nwmdeploy_live_sessions 0\n" in metrics  # no slot leaked by the refused snapshot
    finally:
        srv.stop()


def test_a_state_store_failure_fails_the_sessions_steps_not_the_completions_batched_with_them(lm, tmp_path):
    srv = ThreadServer(ServeConfig(lm[0], name="tiny", persist=tmp_path, max_generate_tokens=100), lm[1])
    try:
        http = srv.client()
        assert http.post("/v1/sessions", json={"id": "s"}).status_code in (200, 201)
        store = srv.app.state.table.log

        def broken(records):
            raise OSError("disk full")

        with http.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 100,
                                                          "temperature": 0, "stream": True}) as events:
            lines = events.iter_lines()
            next(lines)  # the completion is decoding: every engine round holds a step of it
            store.append = broken
            r = http.post("/v1/sessions/s/step", json={"inputs": {"tokens": [[1, 2]]}})
            assert r.status_code == 503, r.text  # the session's step was not made durable
            rest = "\n".join(lines)
        assert '"error"' not in rest and '"finish_reason": "length"' in rest, rest
    finally:
        srv.stop()
