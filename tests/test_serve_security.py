"""`wmdeploy serve` security: sessions belong to the API key that made them (on every route), server-made
ids are unguessable, size limits, and the server stays on 127.0.0.1 unless told otherwise."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import typer.main

from _serve_server import ThreadServer
from wmdeploy.serve import ServeConfig
from wmdeploy.serve.validate import DEFAULT_MAX_CHUNK, Overloaded, resolve_max_chunk

websockets_sync = pytest.importorskip("websockets.sync.client")
websockets_exc = pytest.importorskip("websockets.exceptions")
A, B = {"Authorization": "Bearer key-a"}, {"X-API-Key": "key-b"}


@pytest.fixture(scope="module")
def server(rt_lstm_path, rt_lstm):
    srv = ThreadServer(ServeConfig(rt_lstm_path, name="lm", api_keys=("key-a", "key-b"), max_request_bytes=1 << 16),
                       rt_lstm)
    yield srv
    srv.stop()


def test_a_session_is_invisible_to_other_keys_on_every_route(server, rt_lstm):
    tokens = np.array([[1, 2, 3]])
    with server.client(headers=A) as a, server.client(headers=B) as b:
        assert a.post("/v1/sessions", json={"id": "mine"}).status_code == 201
        assert a.post("/v1/sessions/mine/step", json={"inputs": {"tokens": tokens.tolist()}}).status_code == 200
        snap = a.get("/v1/sessions/mine/snapshot").content
        for method, route, kw in [("GET", "/v1/sessions/{}", {}), ("GET", "/v1/sessions/{}/snapshot", {}),
                                  ("POST", "/v1/sessions/{}/step", {"json": {"inputs": {"tokens": [[1]]}}}),
                                  ("POST", "/v1/sessions/{}/reset", {}), ("DELETE", "/v1/sessions/{}", {})]:
            theirs = b.request(method, route.format("mine"), **kw)
            never = b.request(method, route.format("never"), **kw)
            assert theirs.status_code == never.status_code == 404, (route, theirs.text)
            assert theirs.json()["error"] == never.json()["error"].replace("never", "mine")
        assert "mine" not in b.get("/v1/sessions").json()["sessions"]
        assert "mine" in a.get("/v1/sessions").json()["sessions"]
        # the same id under another key is another session: no 409 reveals that the first exists
        assert b.post("/v1/sessions", json={"id": "mine"}).status_code == 201
        assert b.post("/v1/sessions/mine/step", json={"inputs": {"tokens": [[9]]}}).status_code == 200
        assert a.get("/v1/sessions/mine").json()["steps"] == 1 and a.get("/v1/sessions/mine/snapshot").content == snap
        # KServe sequences are scoped the same way
        v2 = {"inputs": [{"name": "tokens", "shape": [1, 1], "datatype": "INT64", "data": [4]}]}
        assert a.post("/v2/models/lm/infer", json={**v2, "parameters": {"sequence_id": 77, "sequence_start": True}}
                      ).status_code == 200
        theirs = b.post("/v2/models/lm/infer", json={**v2, "parameters": {"sequence_id": 77}})
        never = b.post("/v2/models/lm/infer", json={**v2, "parameters": {"sequence_id": 78}})
        assert theirs.status_code == never.status_code == 400
        assert theirs.json()["error"] == never.json()["error"].replace("78", "77")
    ws_url = server.url.replace("http", "ws") + "/v1/sessions/{}/stream"
    for sid in ("mine", "never"):  # B's own "mine" streams; A's is not reachable from B's key at all
        with websockets_sync.connect(ws_url.format(sid), additional_headers=B) as ws:
            if sid == "never":
                assert json.loads(ws.recv(timeout=10))["error"] == "session 'never': unknown; create it with POST /v1/sessions"
            else:
                ws.send(json.dumps({"inputs": {"tokens": [[1]]}}))
                assert json.loads(ws.recv(timeout=10))["steps"] == 2  # B's session (one step before), not A's


def test_tritonclient_with_another_key_sees_no_sequence(server):
    tc = pytest.importorskip("tritonclient.http")  # only this test needs the client: the others run without it
    v2 = {"inputs": [{"name": "tokens", "shape": [1, 1], "datatype": "INT64", "data": [4]}]}
    with server.client(headers=A) as a:
        assert a.post("/v2/models/lm/infer", json={**v2, "parameters": {"sequence_id": 77, "sequence_start": True}}
                      ).status_code == 200
    client = tc.InferenceServerClient(server.hostport)
    inp = tc.InferInput("tokens", [1, 1], "INT64")
    inp.set_data_from_numpy(np.array([[4]], np.int64))
    with pytest.raises(tc.InferenceServerException) as err:  # tritonclient with B's key: A's sequence is unknown
        client.infer("lm", [inp], sequence_id=77, headers=B)
    assert err.value.status() == "400" and "'77': unknown" in err.value.message()


def test_server_made_ids_are_128_random_bits(server):
    with server.client(headers=A) as c:
        ids = [c.post("/v1/sessions", json={}).json()["id"] for _ in range(3)]
    assert len(set(ids)) == 3
    for sid in ids:
        assert len(base64.urlsafe_b64decode(sid + "==")) == 16  # secrets.token_urlsafe(16)


def test_limits_and_defaults(server, rt_lstm_path, rt_lstm):
    from wmdeploy.cli import app as cli_app  # the package registers every command

    serve_cmd = typer.main.get_command(cli_app).commands["serve"]  # type: ignore[attr-defined]
    assert {p.name: p.default for p in serve_cmd.params}["host"] == "127.0.0.1"
    assert ServeConfig(rt_lstm_path).host == "127.0.0.1"
    spec = rt_lstm.spec
    assert resolve_max_chunk(spec, None) == DEFAULT_MAX_CHUNK == 4096 and resolve_max_chunk(spec, 8) == 8
    spec.meta["max_chunk"] = 16
    try:
        assert resolve_max_chunk(spec, None) == 16 and resolve_max_chunk(spec, 100) == 16  # never past the model's
    finally:
        del spec.meta["max_chunk"]
    with server.client(headers=A) as c:
        c.post("/v1/sessions", json={"id": "big"})
        r = c.post("/v1/sessions/big/step", json={"inputs": {"tokens": [[1] * 40000]}})
        assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]
    with websockets_sync.connect(server.url.replace("http", "ws") + "/v1/sessions/big/stream", additional_headers=A) as ws:
        ws.send(json.dumps({"inputs": {"tokens": [[1] * 40000]}}))  # a WebSocket message over the limit: closed
        with pytest.raises(websockets_exc.ConnectionClosed) as closed:  # not a timeout: the close itself
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009  # "message too big"


def test_the_engine_queue_is_bounded(rt_lstm):
    from wmdeploy.serve.batcher import Batcher
    from wmdeploy.serve.jobs import StepJob
    from wmdeploy.serve.metrics import Metrics
    from wmdeploy.serve.sessions import SessionTable

    batcher = Batcher(SessionTable(rt_lstm, 4, None, None, Metrics()), max_queue=2)  # not started: nothing drains
    feeds = {"tokens": np.array([[1]])}
    batcher.enqueue(StepJob("a", feeds))
    batcher.enqueue(StepJob("b", feeds))
    with pytest.raises(Overloaded, match="retry later"):
        batcher.enqueue(StepJob("c", feeds))
    # session-table operations (create, snapshot, list, ...) queue on the same engine thread: bounded too
    import asyncio  # noqa: PLC0415

    with pytest.raises(Overloaded, match="2 jobs are already queued"):
        asyncio.run(batcher.call(len, "x"))


@pytest.mark.parametrize("field, value, message", [
    ("session_ttl", float("nan"), "--session-ttl: nan"),
    ("session_ttl", float("inf"), "--session-ttl: inf"),
    ("session_ttl", 0.0, "--session-ttl: 0.0"),
    ("batch_window_ms", float("inf"), "--batch-window-ms: inf"),
    ("batch_window_ms", -1.0, "--batch-window-ms: -1.0"),
    ("max_batch", 0, "--max-batch: 0"),
    ("max_sessions", 0, "--max-sessions: 0"),
    ("max_chunk", 0, "--max-chunk: 0"),
    ("persist_ttl", float("nan"), "--persist-ttl: nan"),
    ("request_timeout", 0.0, "--request-timeout: 0.0"),
    ("request_timeout", float("inf"), "--request-timeout: inf"),
    ("max_generate_tokens", 0, "--max-generate-tokens: 0"),
])
def test_numbers_that_would_break_the_engine_are_refused_up_front(field, value, message):
    from wmdeploy.errors import InputError
    from wmdeploy.serve import ServeConfig

    with pytest.raises(InputError, match=message):
        ServeConfig("model.onnx", **{field: value})


@pytest.mark.parametrize("keys", [("",), ("good", "  ")])
def test_an_empty_api_key_is_refused(keys):
    # `--api-key "$KEY"` with KEY unset made "" a key: "Authorization: Bearer " then got in
    from wmdeploy.errors import InputError
    from wmdeploy.serve import ServeConfig

    with pytest.raises(InputError, match="--api-key: an empty key"):
        ServeConfig("model.onnx", api_keys=keys)
