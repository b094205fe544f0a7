"""Generation over the server's WebSocket: the library's loop, batched with other sessions' steps."""
from __future__ import annotations

import json

import pytest
import torch

import wmdeploy
from _serve_server import ThreadServer
from wmdeploy.models.lstm_lm import LSTMLanguageModel
from wmdeploy.serve import ServeConfig

websockets_sync = pytest.importorskip("websockets.sync.client")


@pytest.fixture(scope="module")
def lm_server(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gen_serve") / "lm.onnx"
    wmdeploy.export(LSTMLanguageModel(embed_dim=16, hidden_size=32, num_layers=1), path, verify=False)
    model = wmdeploy.load(path)
    srv = ThreadServer(ServeConfig(path, name="lm", batch_window_ms=1), model)
    yield srv, model
    srv.stop()


def _generate(ws, **body) -> list[dict]:
    ws.send(json.dumps(body))
    messages = []
    while True:
        messages.append(json.loads(ws.recv(timeout=30)))
        if "done" in messages[-1] or "error" in messages[-1]:
            return messages


def test_websocket_generation_equals_the_library_and_continues_the_session(lm_server):
    srv, model = lm_server
    with srv.client() as c:
        assert c.post("/v1/sessions", json={"id": "g1"}).status_code == 201
    local = model.stream()
    first = wmdeploy.generate(local, "Once upon", max_tokens=12, seed=3)
    second = wmdeploy.generate(local, " and then", max_tokens=8, seed=4)
    with websockets_sync.connect(srv.url.replace("http", "ws") + "/v1/sessions/g1/generate") as ws:
        a = _generate(ws, prompt="Once upon", max_tokens=12, seed=3)
        b = _generate(ws, prompt=" and then", max_tokens=8, seed=4)  # continues the same memory
        bad = _generate(ws, prompt="x", max_tokens="many")
    assert "".join(m.get("text", "") for m in a) == first.text()
    assert a[-1]["tokens"] == first.tokens and a[-1]["stats"]["prompt_tokens"] == 9
    assert "".join(m.get("text", "") for m in b) == second.text()
    assert bad == [{"error": "message field 'max_tokens': expected a number, got 'many'"}]
    with srv.client() as c:
        steps = c.get("/v1/sessions/g1").json()["steps"]
    assert steps == local.steps  # every prompt chunk and sampled token went into the session


def test_generation_on_an_unknown_session_is_refused(lm_server):
    srv, _ = lm_server
    with websockets_sync.connect(srv.url.replace("http", "ws") + "/v1/sessions/nope/generate") as ws:
        assert "'nope'" in json.loads(ws.recv(timeout=10))["error"]


def test_generation_odd_options_are_answered_and_a_closed_socket_stops_generating(lm_server):
    srv, _ = lm_server
    with srv.client() as c:
        assert c.post("/v1/sessions", json={"id": "g3"}).status_code == 201
    url = srv.url.replace("http", "ws") + "/v1/sessions/g3/generate"
    with websockets_sync.connect(url) as ws:
        for text in ('{"prompt": "a", "max_tokens": 1e400}', '{"prompt": "a", "seed": -1}', "[" * 100_000):
            ws.send(text)  # each is answered with one error line, never left waiting
            assert "error" in json.loads(ws.recv(timeout=30)), text
    with websockets_sync.connect(url) as ws:
        ws.send(json.dumps({"prompt": "a", "max_tokens": 10 ** 7}))
        for _ in range(3):
            assert "text" in json.loads(ws.recv(timeout=30))
    import time  # noqa: PLC0415

    with srv.client() as c:
        deadline, last = time.monotonic() + 20, -1
        while True:  # the orphaned loop stops at its next token: the step count settles
            time.sleep(0.5)
            steps = c.get("/v1/sessions/g3").json()["steps"]
            if steps == last:
                break
            assert time.monotonic() < deadline, "generation went on after its WebSocket closed"
            last = steps
        assert steps < 1000
