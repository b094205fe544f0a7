"""`wmdeploy serve`, JSON session API: sessions, snapshots, WebSocket order, batching, eviction, security."""
from __future__ import annotations

import base64
import json
import re
import threading
import time

import httpx
import numpy as np
import pytest

from _serve_server import ThreadServer
from wmdeploy.serve import ServeConfig

websockets_sync = pytest.importorskip("websockets.sync.client")
websockets_exc = pytest.importorskip("websockets.exceptions")


@pytest.fixture(scope="module")
def server(rt_lstm_path, rt_lstm):
    srv = ThreadServer(ServeConfig(rt_lstm_path, name="lm", batch_window_ms=20, max_batch=64), rt_lstm)
    yield srv
    srv.stop()


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def _step(client: httpx.Client, sid: str, tokens: np.ndarray) -> httpx.Response:
    return client.post(f"/v1/sessions/{sid}/step", json={"inputs": {"tokens": tokens.tolist()}})


def test_session_api_snapshot_roundtrip(server, rt_lstm):
    rng = np.random.default_rng(3)
    local = rt_lstm.stream()
    with server.client() as c:
        r = c.post("/v1/sessions", json={"id": "s1"})
        assert r.status_code == 201 and r.json()["steps"] == 0
        assert c.post("/v1/sessions", json={"id": "s1"}).status_code == 409
        for n in (2, 4):
            tokens = rng.integers(0, 16, size=(1, n))
            r = _step(c, "s1", tokens)
            assert r.status_code == 200, r.text
            np.testing.assert_array_equal(np.asarray(r.json()["outputs"]["logits"], np.float32),
                                          local.step(tokens=tokens)["logits"])
        blob = c.get("/v1/sessions/s1/snapshot").content
        assert blob == local.snapshot()  # the same self-checking bytes as Stream.snapshot
        assert c.get("/v1/sessions/s1").json()["steps"] == 2
        # a new session from the snapshot, by JSON (base64) and by raw bytes; both continue identically
        assert c.post("/v1/sessions", json={"id": "s2", "snapshot": base64.b64encode(blob).decode()}).status_code == 201
        assert c.post("/v1/sessions?id=s3", content=blob,
                      headers={"content-type": "application/octet-stream"}).status_code == 201
        tokens = rng.integers(0, 16, size=(1, 3))
        want = local.step(tokens=tokens)["logits"]
        for sid in ("s1", "s2", "s3"):
            np.testing.assert_array_equal(np.asarray(_step(c, sid, tokens).json()["outputs"]["logits"], np.float32), want)
        assert c.post("/v1/sessions/s2/reset").json()["steps"] == 0
        fresh = rt_lstm.stream().step(tokens=tokens)["logits"]
        np.testing.assert_array_equal(np.asarray(_step(c, "s2", tokens).json()["outputs"]["logits"], np.float32), fresh)
        r = c.post("/v1/sessions", content=b"garbage", headers={"content-type": "application/octet-stream"})
        assert r.status_code == 400 and "snapshot" in r.json()["error"]
        for sid in ("s1", "s2", "s3"):
            assert c.delete(f"/v1/sessions/{sid}").status_code == 204
        r = _step(c, "s1", tokens)
        assert r.status_code == 404 and "s1" in r.json()["error"]


def test_bad_step_is_400_and_leaves_state(server, rt_lstm):
    local = rt_lstm.stream()
    with server.client() as c:
        c.post("/v1/sessions", json={"id": "b1"})
        tokens = np.array([[1, 2, 3]])
        _step(c, "b1", tokens)
        local.step(tokens=tokens)
        before = c.get("/v1/sessions/b1/snapshot").content
        for body, expected in [
            ({"inputs": {"tokens": [[1.5, 2.0]]}}, "input 'tokens': list of float64 values, expected int64"),
            ({"inputs": {"tokens": [1, 2]}}, "input 'tokens': rank 1"),
            ({"inputs": {"tokens": [[1], [2]]}}, "input 'tokens': axis 0"),
            ({"inputs": {"tokens": [[1]], "h": [[0]]}}, "input 'h': unknown"),
            ({"inputs": {}}, "input 'tokens': missing"),
            ({"input": {}}, "inputs: expected an object"),
        ]:
            r = c.post("/v1/sessions/b1/step", json=body)
            assert r.status_code == 400 and expected in r.json()["error"], (body, r.text)
        r = c.post("/v1/sessions/b1/step", content=b"{not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
        assert c.get("/v1/sessions/b1/snapshot").content == before
        r = _step(c, "b1", tokens)
        np.testing.assert_array_equal(np.asarray(r.json()["outputs"]["logits"], np.float32),
                                      local.step(tokens=tokens)["logits"])
        assert c.get("/v2/health/live").status_code == 200  # still serving


def test_websocket_streams_in_order(server, rt_lstm):
    rng = np.random.default_rng(4)
    chunks = [rng.integers(0, 16, size=(1, int(n))) for n in rng.integers(1, 5, size=12)]
    local = rt_lstm.stream()
    with server.client() as c:
        c.post("/v1/sessions", json={"id": "ws1"})
    ws_url = server.url.replace("http", "ws") + "/v1/sessions/ws1/stream"
    with websockets_sync.connect(ws_url) as ws:
        for i, ch in enumerate(chunks):  # pipelined: every chunk sent before reading any answer
            ws.send(json.dumps({"inputs": {"tokens": ch.tolist()}}))
            if i == 5:
                ws.send(json.dumps({"inputs": {"tokens": [[0.5]]}}))  # a bad one in the middle: an error, in order
        answers = [json.loads(ws.recv(timeout=30)) for _ in range(len(chunks) + 1)]
    assert [a["seq"] for a in answers] == list(range(len(chunks) + 1))
    assert "expected int64" in answers[6]["error"]
    good = answers[:6] + answers[7:]
    assert [a["steps"] for a in good] == list(range(1, len(chunks) + 1))
    for a, ch in zip(good, chunks):
        np.testing.assert_array_equal(np.asarray(a["outputs"]["logits"], np.float32), local.step(tokens=ch)["logits"])
    with websockets_sync.connect(server.url.replace("http", "ws") + "/v1/sessions/nope/stream") as ws:
        assert "'nope': unknown" in json.loads(ws.recv(timeout=10))["error"]


def test_concurrent_sessions_are_batched_and_isolated(server, rt_lstm):
    n_threads, steps = 16, 6
    rng = np.random.default_rng(5)
    plans = {f"c{i}": [rng.integers(0, 16, size=(1, int(rng.integers(1, 3)))) for _ in range(steps)]
             for i in range(n_threads)}
    got: dict[str, list[np.ndarray]] = {}
    barrier = threading.Barrier(n_threads)
    with server.client() as c:
        before = _metric(c.get("/metrics").text, "wmdeploy_batch_size_count")
        multi_before = before - _metric(c.get("/metrics").text, 'wmdeploy_batch_size_bucket{le="1"}')

    def run(sid: str) -> None:
        with server.client() as c:
            assert c.post("/v1/sessions", json={"id": sid}).status_code == 201
            out = []
            for tokens in plans[sid]:
                barrier.wait(timeout=30)  # everyone steps at once
                r = _step(c, sid, tokens)
                assert r.status_code == 200, r.text
                out.append(np.asarray(r.json()["outputs"]["logits"], np.float32))
            got[sid] = out

    threads = [threading.Thread(target=run, args=(sid,)) for sid in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(got) == set(plans)
    for sid, chunks in plans.items():
        alone = rt_lstm.stream()
        for tokens, out in zip(chunks, got[sid]):
            np.testing.assert_allclose(out, alone.step(tokens=tokens)["logits"], rtol=1e-5, atol=1e-6)
    with server.client() as c:
        text = c.get("/metrics").text
    batches = _metric(text, "wmdeploy_batch_size_count") - before
    multi = _metric(text, "wmdeploy_batch_size_count") - _metric(text, 'wmdeploy_batch_size_bucket{le="1"}') - multi_before
    assert batches < n_threads * steps  # fewer engine rounds than steps
    assert multi >= 1  # at least one pool step carried several sessions
    assert _metric(text, "wmdeploy_live_sessions") >= n_threads


def test_api_key_and_request_limits(rt_lstm_path, rt_lstm):
    srv = ThreadServer(ServeConfig(rt_lstm_path, name="lm", api_keys=("k1", "k2"), max_request_bytes=4096), rt_lstm)
    try:
        with srv.client() as c:
            assert c.get("/v2/health/live").status_code == 200 and c.get("/v2/health/ready").status_code == 200
            r = c.post("/v1/sessions", json={})
            assert r.status_code == 401 and "API key" in r.json()["error"]
            assert c.get("/v2/models/lm", headers={"Authorization": "Bearer nope"}).status_code == 401
            assert c.get("/v2/models/lm", headers={"Authorization": "Bearer k2"}).status_code == 200
            r = c.post("/v1/sessions", json={"id": "x"}, headers={"X-API-Key": "k1"})
            assert r.status_code == 201
            r = c.post("/v1/sessions/x/step", headers={"X-API-Key": "k1"},
                       json={"inputs": {"tokens": [[1] * 3000]}})
            assert r.status_code == 413 and "limit" in r.json()["error"]
        # no key: the handshake is refused (the server closes before accepting: HTTP 403), never a timeout
        with pytest.raises(websockets_exc.InvalidStatus) as refused:
            with websockets_sync.connect(srv.url.replace("http", "ws") + "/v1/sessions/x/stream") as ws:
                ws.recv(timeout=5)
        assert refused.value.response.status_code == 403
    finally:
        srv.stop()


def test_max_sessions_429_never_drops_a_live_sequence(rt_lstm_path, rt_lstm):
    srv = ThreadServer(ServeConfig(rt_lstm_path, name="lm", max_sessions=2), rt_lstm)
    try:
        with srv.client() as c:
            assert c.post("/v1/sessions", json={"id": "a"}).status_code == 201
            assert c.post("/v1/sessions", json={"id": "b"}).status_code == 201
            r = c.post("/v1/sessions", json={"id": "c"})
            assert r.status_code == 429 and "--max-sessions 2" in r.json()["error"] and r.headers["retry-after"]
            r = c.post("/v2/models/lm/infer", json={"inputs": [{"name": "tokens", "shape": [1, 1], "datatype": "INT64",
                                                                 "data": [1]}],
                                                     "parameters": {"sequence_id": 3, "sequence_start": True}})
            assert r.status_code == 429
            assert _step(c, "a", np.array([[1]])).status_code == 200  # the live ones are untouched
            assert c.delete("/v1/sessions/b").status_code == 204
            assert c.post("/v1/sessions", json={"id": "c"}).status_code == 201
    finally:
        srv.stop()


def test_ttl_eviction_restores_transparently_with_persist(rt_lstm_path, rt_lstm, tmp_path):
    srv = ThreadServer(ServeConfig(rt_lstm_path, name="lm", session_ttl=0.3, persist=tmp_path / "state"), rt_lstm)
    local = rt_lstm.stream()
    tokens = np.array([[5, 6, 7]])
    try:
        with srv.client() as c:
            c.post("/v1/sessions", json={"id": "t1"})
            _step(c, "t1", tokens)
            local.step(tokens=tokens)
            deadline = time.monotonic() + 5
            while c.get("/v1/sessions/t1").json()["resident"] and time.monotonic() < deadline:
                time.sleep(0.1)
            text = c.get("/metrics").text
            assert _metric(text, 'wmdeploy_evictions_total{reason="ttl"}') >= 1
            assert _metric(text, "wmdeploy_live_sessions") == 0
            assert _metric(text, "wmdeploy_persisted_sessions") == _metric(text, "wmdeploy_persisted_only_sessions") == 1
            assert _metric(text, "wmdeploy_queue_seconds_count") == _metric(text, "wmdeploy_compute_seconds_count") == 1
            assert _metric(text, "wmdeploy_compute_seconds_sum") > 0
            r = _step(c, "t1", tokens)  # restored from the log on its next request
            assert r.status_code == 200 and r.json()["steps"] == 2
            np.testing.assert_array_equal(np.asarray(r.json()["outputs"]["logits"], np.float32),
                                          local.step(tokens=tokens)["logits"])
            assert _metric(c.get("/metrics").text, "wmdeploy_restores_total") == 1
    finally:
        srv.stop()


def test_ttl_eviction_without_persist_says_why(rt_lstm_path, rt_lstm):
    srv = ThreadServer(ServeConfig(rt_lstm_path, name="lm", session_ttl=0.2), rt_lstm)
    try:
        with srv.client() as c:
            c.post("/v1/sessions", json={"id": "gone"})
            time.sleep(0.8)
            r = _step(c, "gone", np.array([[1]]))
            assert r.status_code == 404 and "--session-ttl" in r.json()["error"] and "--persist" in r.json()["error"]
    finally:
        srv.stop()


def _with_meta(blob: bytes, meta: object) -> bytes:
    """``blob`` with its header's meta replaced, re-checksummed (what any client can craft)."""
    import hashlib  # noqa: PLC0415

    from wmdeploy import snapshot as snap  # noqa: PLC0415

    hlen = snap._PREFIX.unpack_from(blob, 0)[3]
    header = json.loads(blob[snap._PREFIX.size:snap._PREFIX.size + hlen])
    header["meta"] = meta
    h = json.dumps(header).encode()
    body = snap._PREFIX.pack(snap.MAGIC, snap.VERSION, 0, len(h)) + h + blob[snap._PREFIX.size + hlen:-32]
    return body + hashlib.sha256(body).digest()


def test_snapshot_with_bad_meta_is_400_and_takes_no_slot(rt_lstm_path, rt_lstm):
    srv = ThreadServer(ServeConfig(rt_lstm_path, name="lm", max_sessions=2), rt_lstm)
    try:
        with srv.client() as c:
            blob = rt_lstm.stream().snapshot()
            for meta in ({"steps": "x"}, [1, 2], "ab", {"steps": -3}, {"steps": None}):
                r = c.post("/v1/sessions?id=m", content=_with_meta(blob, meta),
                           headers={"content-type": "application/octet-stream"})
                assert r.status_code == 400 and "snapshot" in r.json()["error"], (meta, r.text)
            # no slot leaked: both sessions of --max-sessions 2 can still be made
            assert c.post("/v1/sessions", json={"id": "k1"}).status_code == 201
            assert c.post("/v1/sessions?id=k2", content=_with_meta(blob, {"steps": 5}),
                          headers={"content-type": "application/octet-stream"}).json()["steps"] == 5
    finally:
        srv.stop()


def test_base64_outputs_are_the_exact_little_endian_bytes(server, rt_lstm):
    tokens = np.array([[3, 1, 4]])
    want = rt_lstm.stream().step(tokens=tokens)["logits"]
    with server.client() as c:
        assert c.post("/v1/sessions", json={"id": "b64"}).status_code == 201
        r = c.post("/v1/sessions/b64/step", json={"inputs": {"tokens": tokens.tolist()}, "encoding": "base64"})
        assert r.status_code == 200, r.text
        out = r.json()["outputs"]["logits"]
    assert out["datatype"] == "FP32" and out["shape"] == list(want.shape)
    got = np.frombuffer(base64.b64decode(out["base64"]), "<f4").reshape(out["shape"])
    np.testing.assert_array_equal(got, want)
    ws_url = server.url.replace("http", "ws") + "/v1/sessions/b64/stream"
    with websockets_sync.connect(ws_url) as ws:  # the WebSocket takes the same option per message
        ws.send(json.dumps({"inputs": {"tokens": tokens.tolist()}, "encoding": "base64"}))
        answer = json.loads(ws.recv(timeout=30))
    assert answer["steps"] == 2 and answer["outputs"]["logits"]["datatype"] == "FP32"


def test_at_capacity_the_idle_session_past_its_ttl_is_evicted_and_restored(rt_lstm_path, rt_lstm, tmp_path):
    """--max-sessions 2 and a TTL far longer than the sweep would need: a third session takes the slot of the
    least-recently-used one idle past its TTL (an eviction for capacity), which comes back from --persist."""
    srv = ThreadServer(ServeConfig(rt_lstm_path, name="lm", max_sessions=2, session_ttl=0.3,
                                   persist=tmp_path / "state"), rt_lstm)
    tokens = np.array([[2, 7]])
    try:
        with srv.client() as c:
            table = srv.app.state.table
            table.sweep = lambda: 0  # no TTL sweep: the slot must come from _make_room at capacity
            for sid in ("old", "new"):
                assert c.post("/v1/sessions", json={"id": sid}).status_code == 201
            assert _step(c, "old", tokens).status_code == 200
            time.sleep(0.4)  # both idle past the TTL; "new" was used last
            assert _step(c, "new", tokens).status_code == 200
            assert c.post("/v1/sessions", json={"id": "third"}).status_code == 201
            assert c.get("/v1/sessions/old").json()["resident"] is False  # the LRU one past its TTL left
            text = c.get("/metrics").text
            assert _metric(text, 'wmdeploy_evictions_total{reason="capacity"}') == 1
            time.sleep(0.4)
            local = rt_lstm.stream()
            local.step(tokens=tokens)
            r = _step(c, "old", tokens)  # restored (evicting another idle one), exactly where it was
            assert r.status_code == 200 and r.json()["steps"] == 2
            np.testing.assert_array_equal(np.asarray(r.json()["outputs"]["logits"], np.float32),
                                          local.step(tokens=tokens)["logits"])
    finally:
        srv.stop()
