"""Generation over the server's WebSocket: the library's loop, batched with other sessions' steps."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

import wmdeploy
from _serve_server import ThreadServer, ws_generate
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


def test_websocket_generation_equals_the_library_and_continues_the_session(lm_server):
    srv, model = lm_server
    with srv.client() as c:
        assert c.post("/v1/sessions", json={"id": "g1"}).status_code == 201
    local = model.stream()
    first = wmdeploy.generate(local, "Once upon", max_tokens=12, seed=3)
    second = wmdeploy.generate(local, " and then", max_tokens=8, seed=4)
    with websockets_sync.connect(srv.url.replace("http", "ws") + "/v1/sessions/g1/generate") as ws:
        a = ws_generate(ws, prompt="Once upon", max_tokens=12, seed=3)
        b = ws_generate(ws, prompt=" and then", max_tokens=8, seed=4)  # continues the same memory
        bad = ws_generate(ws, prompt="x", max_tokens="many")
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
        ws.send(json.dumps({"prompt": "a", "max_tokens": 10 ** 7}))  # beyond --max-generate-tokens (4096)
        assert json.loads(ws.recv(timeout=30)) == {
            "error": "message field 'max_tokens': 10000000, the limit is 4096 (--max-generate-tokens)"}
    with websockets_sync.connect(url) as ws:
        ws.send(json.dumps({"prompt": "a", "max_tokens": 4096}))
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


class _Recorder:
    """A local stream that keeps its state after every step: the prefixes a served session may hold."""

    batch = 1

    def __init__(self, model) -> None:
        self.inner, self.model, self.spec = model.stream(), model, model.spec
        self.states = [{k: np.array(v) for k, v in self.inner.state.items()}]

    def step(self, **inputs):
        out = self.inner.step(**inputs)
        self.states.append({k: np.array(v) for k, v in self.inner.state.items()})
        return out


def _settled_steps(c, sid: str) -> int:
    deadline, last = time.monotonic() + 30, -1
    while True:
        steps = c.get(f"/v1/sessions/{sid}").json()["steps"]
        if steps == last:
            return steps
        assert time.monotonic() < deadline, f"{sid}: generation went on after its WebSocket closed"
        last = steps
        time.sleep(0.5)


@pytest.mark.parametrize("read", [0, 2, 15])
def test_generation_closed_midway_leaves_a_prefix_of_prompt_and_tokens(lm_server, read):
    """The socket is dropped (no close frame) while the prompt is prefilled or tokens are sampled: the memory
    holds the steps up to some point of the same generation run locally, never more than it ran."""
    from wmdeploy import snapshot as snap  # noqa: PLC0415

    srv, model = lm_server
    sid, prompt = f"gp{read}", "The river ran past the mill, " * 12
    with srv.client() as c:
        assert c.post("/v1/sessions", json={"id": sid}).status_code == 201
    with websockets_sync.connect(srv.url.replace("http", "ws") + f"/v1/sessions/{sid}/generate") as ws:
        ws.send(json.dumps({"prompt": prompt, "max_tokens": 400, "seed": read}))
        for _ in range(read):
            assert "text" in json.loads(ws.recv(timeout=30))
        ws.close_socket()
    local = _Recorder(model)
    for _ in wmdeploy.generate(local, prompt, max_tokens=400, seed=read):
        pass
    with srv.client() as c:
        steps = _settled_steps(c, sid)
        blob = c.get(f"/v1/sessions/{sid}/snapshot").content
    assert steps < len(local.states) - 1 or read == 0  # it stopped early (a read of 0 may end in the prefill)
    held = snap.loads(model.spec, blob)
    for name, want in local.states[steps].items():
        np.testing.assert_allclose(held[name], want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_client_that_does_not_read_stalls_its_generation(lm_server):
    """Backpressure: the worker runs at most a few messages ahead of the socket, so a silent client costs
    bounded memory and no engine time; reading again resumes the generation."""
    import socket  # noqa: PLC0415

    _, model = lm_server
    srv = ThreadServer(ServeConfig(model.path, name="lm", max_generate_tokens=10 ** 6), model)
    try:
        with srv.client() as c:
            assert c.post("/v1/sessions", json={"id": "silent"}).status_code == 201
        # small kernel buffers on both ends (an accepted socket inherits the listener's), as over a real
        # network: on loopback they autotune to megabytes, which would hold ~10^5 token messages
        srv.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.port))
        with websockets_sync.connect(srv.url.replace("http", "ws") + "/v1/sessions/silent/generate", sock=sock,
                                     max_queue=4) as ws:
            ws.send(json.dumps({"prompt": "a", "max_tokens": 10 ** 6}))
            with srv.client() as c:
                stalled = _settled_steps(c, "silent")
                assert stalled < 20_000  # bounded by the socket's buffers + the worker's outbox, not by max_tokens
                for _ in range(40):  # reading drains the buffers, and then the worker goes on
                    for _ in range(1000):
                        assert "text" in json.loads(ws.recv(timeout=30))
                    if c.get("/v1/sessions/silent").json()["steps"] > stalled:
                        break
                assert c.get("/v1/sessions/silent").json()["steps"] > stalled  # reading resumed it
    finally:
        srv.stop()


def test_sigterm_during_a_generation_leaves_a_prefix_of_it(tmp_path):
    """SIGTERM while a generation streams tokens: the server exits 0, and after a restart on the same
    --persist the session holds the state after exactly some number of the generation's steps (at least
    the tokens the client had read), never a state the local run of the same generation never had."""
    from _serve_server import ProcessServer
    from wmdeploy import snapshot as snap  # noqa: PLC0415

    import httpx  # noqa: PLC0415

    path = tmp_path / "lm.onnx"
    torch.manual_seed(0)
    wmdeploy.export(LSTMLanguageModel(embed_dim=16, hidden_size=32, num_layers=1), path, verify=False)
    served, tokens = wmdeploy.load(path), 1500
    args = ("--name", "lm", "--persist", str(tmp_path / "state"))
    srv = ProcessServer(path, *args, log=tmp_path / "serve.log")
    prompt, read = "The river ran past the mill, " * 4, 0
    try:
        assert httpx.post(srv.url + "/v1/sessions", json={"id": "g"}).status_code == 201
        with websockets_sync.connect(srv.url.replace("http", "ws") + "/v1/sessions/g/generate", close_timeout=1) as ws:
            ws.send(json.dumps({"prompt": prompt, "max_tokens": tokens, "seed": 3}))
            while read < 20:
                message = json.loads(ws.recv(timeout=30))
                assert "text" in message, message
                read += 1
            code = srv.terminate(timeout=40)
    finally:
        srv.kill()
    assert code == 0
    local = _Recorder(served)
    for _ in wmdeploy.generate(local, prompt, max_tokens=tokens, seed=3):
        pass
    srv = ProcessServer(path, *args, log=tmp_path / "serve.log")
    try:
        steps = httpx.get(srv.url + "/v1/sessions/g").json()["steps"]
        blob = httpx.get(srv.url + "/v1/sessions/g/snapshot").content
    finally:
        srv.kill()
    prefill = len(local.states) - 1 - tokens  # the prompt's steps, then one per sampled token
    assert prefill + read <= steps < len(local.states) - 1  # what was read is held; it did not run to the end
    held = snap.loads(served.spec, blob)
    for name, want in local.states[steps].items():
        np.testing.assert_allclose(held[name], want, rtol=1e-5, atol=1e-5)
