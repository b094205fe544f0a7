"""`wmdeploy serve` under faults: what a memory holds after a client vanishes, and that nothing ever hangs.

* A WebSocket closed with chunks in flight (abruptly, or by SIGTERM): the session's memory equals a local
  stream fed a *prefix* of the chunks sent (all, or up to some chunk; never with a hole).
* A store whose writes fail, an unexpected exception inside a batch, a slow store past the server's
  deadline: the request is answered (503 / 500 naming the cause), the engine goes on, the session keeps
  its last durable state, and the server serves again once the fault is gone.
"""
from __future__ import annotations

import json
import random
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest

from _serve_server import FaultyStore, ThreadServer
from wmdeploy import snapshot as snap
from wmdeploy.serve import ServeConfig

websockets_sync = pytest.importorskip("websockets.sync.client")
N_CHUNKS = 50


def _chunks(seed: int, n: int = N_CHUNKS) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 16, size=(1, int(rng.integers(1, 4))), dtype=np.int64) for _ in range(n)]


def _prefix_states(model: Any, chunks: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The state of a local stream after each prefix of ``chunks`` (index k: the first k chunks)."""
    s = model.stream()
    states = [{k: np.array(v) for k, v in s.state.items()}]
    for ch in chunks:
        s.step(tokens=ch)
        states.append({k: np.array(v) for k, v in s.state.items()})
    return states


def assert_is_prefix(model: Any, blob: bytes, prefixes: list[dict[str, np.ndarray]], what: str) -> int:
    """The snapshot holds exactly the first ``steps`` chunks (within batching's rounding); returns steps."""
    steps = int(snap.meta(blob)["steps"])
    held = snap.loads(model.spec, blob)
    assert 0 <= steps < len(prefixes), (what, steps)
    for name, want in prefixes[steps].items():
        np.testing.assert_allclose(held[name], want, rtol=1e-5, atol=1e-5,
                                   err_msg=f"{what}: the memory after {steps} steps is not the first {steps} chunks")
    return steps


def _settled_steps(client: httpx.Client, sid: str, quiet_s: float = 0.4, limit_s: float = 20) -> int:
    """The session's step count once it stops moving (the engine has finished what it will run)."""
    deadline, last = time.monotonic() + limit_s, -1
    while True:
        steps = client.get(f"/v1/sessions/{sid}").json()["steps"]
        if steps == last:
            return steps
        assert time.monotonic() < deadline, f"session {sid} never settled"
        last = steps
        time.sleep(quiet_s)


class Keeper(threading.Thread):
    """Steps a few extra sessions now and then over HTTP, so that they count as active: every batch then
    waits its window for them, the pipelined chunks of the WebSockets sit gathered but not yet started,
    and a disconnect lands in that gap (where a dropped chunk used to leave a hole)."""

    def __init__(self, url: str, sids: list[str], headers: dict[str, str] | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.sids, self.headers, self.halt = url, sids, headers or {}, threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30, headers=self.headers) as c:
            while not self.halt.is_set():
                for sid in self.sids:
                    try:
                        c.post(f"/v1/sessions/{sid}/step", json={"inputs": {"tokens": [[1]]}})
                    except httpx.HTTPError:
                        return  # the server is going away (SIGTERM test)
                self.halt.wait(0.1)


def _pipeline_and_vanish(ws_url: str, chunks: list[np.ndarray], read: int, abrupt: bool,
                         headers: dict[str, str] | None = None) -> int:
    """Send every chunk without waiting, read ``read`` answers, then drop the connection; answers read."""
    got = 0
    with websockets_sync.connect(ws_url, additional_headers=headers or {}) as ws:
        for ch in chunks:
            ws.send(json.dumps({"inputs": {"tokens": ch.tolist()}}))
        for _ in range(read):
            answer = json.loads(ws.recv(timeout=30))
            assert "steps" in answer, answer
            got += 1
        if abrupt:
            ws.close_socket()  # no close frame: the TCP connection just ends
    return got


def test_websocket_closed_mid_pipeline_leaves_a_prefix(rt_lstm_path, rt_lstm):
    srv = ThreadServer(ServeConfig(rt_lstm_path, name="lm", batch_window_ms=25), rt_lstm)
    rng = random.Random(19)
    plans = {f"ws{i}": (_chunks(100 + i), rng.randrange(0, 12), i % 3 != 0) for i in range(6)}
    keeper = Keeper(srv.url, ["keep-a", "keep-b"])
    try:
        with srv.client() as c:
            for sid in [*plans, "keep-a", "keep-b"]:
                assert c.post("/v1/sessions", json={"id": sid}).status_code == 201
        keeper.start()
        read: dict[str, int] = {}
        threads = [threading.Thread(target=lambda sid=sid, p=p: read.__setitem__(
            sid, _pipeline_and_vanish(srv.url.replace("http", "ws") + f"/v1/sessions/{sid}/stream", p[0], p[1], p[2])))
            for sid, p in plans.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        keeper.halt.set()
        keeper.join(timeout=10)
        with srv.client() as c:
            for sid, (chunks, _, _) in plans.items():
                _settled_steps(c, sid)
                blob = c.get(f"/v1/sessions/{sid}/snapshot").content
                steps = assert_is_prefix(rt_lstm, blob, _prefix_states(rt_lstm, chunks), sid)
                assert steps >= read[sid]  # every answer the client saw is in the memory
            assert c.get("/v2/health/ready").status_code == 200
    finally:
        keeper.halt.set()
        srv.stop()


def test_sigterm_with_websockets_in_flight_leaves_prefixes(rt_lstm_path, rt_lstm, tmp_path):
    """SIGTERM closes the sockets while chunks are queued: the process exits 0, and after a restart on the
    same --persist each session holds a prefix of its chunks (what was answered, at least)."""
    from _serve_server import ProcessServer

    state = tmp_path / "state"
    args = ("--name", "lm", "--persist", str(state), "--batch-window-ms", "25")
    srv = ProcessServer(rt_lstm_path, *args, log=tmp_path / "serve.log")
    plans = {f"term{i}": _chunks(200 + i) for i in range(3)}
    read: dict[str, int] = {}
    keeper = Keeper(srv.url, ["keep"])
    try:
        for sid in [*plans, "keep"]:
            assert httpx.post(srv.url + "/v1/sessions", json={"id": sid}).status_code == 201
        keeper.start()

        def client(sid: str) -> None:
            try:
                with websockets_sync.connect(srv.url.replace("http", "ws") + f"/v1/sessions/{sid}/stream") as ws:
                    for ch in plans[sid]:
                        ws.send(json.dumps({"inputs": {"tokens": ch.tolist()}}))
                    n = 0
                    while True:
                        answer = json.loads(ws.recv(timeout=30))
                        if "steps" not in answer:
                            break
                        n += 1
                        read[sid] = n
            except Exception:  # noqa: BLE001  (the server closed the socket: expected)
                pass

        threads = [threading.Thread(target=client, args=(sid,)) for sid in plans]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while sum(read.values()) < 6 and time.monotonic() < deadline:  # mid-pipeline: some answered
            time.sleep(0.01)
        code = srv.terminate(timeout=40)
        for t in threads:
            t.join(timeout=30)
        keeper.halt.set()
    finally:
        keeper.halt.set()
        srv.kill()
    assert code == 0
    srv = ProcessServer(rt_lstm_path, *args, log=tmp_path / "serve.log")
    try:
        for sid, chunks in plans.items():
            blob = httpx.get(srv.url + f"/v1/sessions/{sid}/snapshot").content
            steps = assert_is_prefix(rt_lstm, blob, _prefix_states(rt_lstm, chunks), sid)
            assert steps >= read.get(sid, 0)
    finally:
        srv.kill()


# ---- engine faults: answered, never hung ----------------------------------------------------------------
def _logits(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["outputs"]["logits"], np.float32)


def test_a_failing_store_is_503_and_the_engine_goes_on(rt_lstm_path, rt_lstm, tmp_path):
    srv = ThreadServer(ServeConfig(rt_lstm_path, name="lm", persist=tmp_path / "state"), rt_lstm)
    table = srv.app.state.table
    flaky = table.log = FaultyStore(table.log)
    chunks = _chunks(5, 4)
    local = rt_lstm.stream()
    try:
        with srv.client(timeout=15) as c:  # an engine thread that died would leave this waiting: ReadTimeout
            assert c.post("/v1/sessions", json={"id": "a"}).status_code == 201
            np.testing.assert_array_equal(_logits(c.post("/v1/sessions/a/step", json={"inputs": {
                "tokens": chunks[0].tolist()}})), local.step(tokens=chunks[0])["logits"])
            for fault in (OSError(28, "No space left on device"), RuntimeError("connection reset by the store")):
                flaky.fail = fault  # not a PersistError: what a real disk or client library raises
                r = c.post("/v1/sessions/a/step", json={"inputs": {"tokens": chunks[1].tolist()}})
                assert r.status_code == 503 and r.headers["retry-after"], r.text
                assert "state store" in r.json()["error"] and str(fault.args[-1]) in r.json()["error"]
                assert c.get("/v2/health/ready").status_code == 200  # the engine thread is alive
                assert c.get("/v1/sessions/a").json()["steps"] == 1  # the failed step was not applied
            flaky.fail = None
            for ch in chunks[2:]:  # recovered: exactly as if the failed steps had never been sent
                np.testing.assert_array_equal(_logits(c.post("/v1/sessions/a/step", json={"inputs": {
                    "tokens": ch.tolist()}})), local.step(tokens=ch)["logits"])
            assert 'wmdeploy_errors_total{kind="persist"} 2' in c.get("/metrics").text
    finally:
        srv.stop()


def test_an_exception_inside_a_batch_is_500_naming_it_and_the_engine_goes_on(rt_lstm_path, rt_lstm):
    srv = ThreadServer(ServeConfig(rt_lstm_path, name="lm"), rt_lstm)
    table = srv.app.state.table
    try:
        with srv.client(timeout=15) as c:
            assert c.post("/v1/sessions", json={"id": "b"}).status_code == 201

            def broken(_: Any) -> None:
                raise ValueError("injected fault in the batch")

            table.touch = broken  # fails after the engine call, outside every per-step guard
            r = c.post("/v1/sessions/b/step", json={"inputs": {"tokens": [[1, 2]]}})
            assert r.status_code == 500 and "ValueError: injected fault in the batch" in r.json()["error"], r.text
            del table.touch
            r = c.post("/v1/sessions/b/step", json={"inputs": {"tokens": [[3]]}})
            assert r.status_code == 200 and c.get("/v2/health/ready").status_code == 200
    finally:
        srv.stop()


def test_no_request_waits_past_the_deadline(rt_lstm_path, rt_lstm, tmp_path):
    """A store that stalls: the stalled step is answered 503 at --request-timeout (it was running: it may
    land), a step queued behind it is 503 and never runs, and the server serves once the stall ends."""
    srv = ThreadServer(ServeConfig(rt_lstm_path, name="lm", persist=tmp_path / "state", request_timeout=0.5,
                                   batch_window_ms=0), rt_lstm)
    table = srv.app.state.table
    flaky = table.log = FaultyStore(table.log)
    answers: dict[str, httpx.Response] = {}
    try:
        with srv.client(timeout=15) as c:
            for sid in ("slow", "queued"):
                assert c.post("/v1/sessions", json={"id": sid}).status_code == 201
            flaky.delay = 2.0

            def step(sid: str) -> None:
                with srv.client(timeout=15) as cc:
                    answers[sid] = cc.post(f"/v1/sessions/{sid}/step", json={"inputs": {"tokens": [[1]]}})

            first = threading.Thread(target=step, args=("slow",))
            first.start()
            time.sleep(0.2)  # "slow" is in the store's stall; "queued" waits behind it
            second = threading.Thread(target=step, args=("queued",))
            second.start()
            first.join(timeout=15)
            second.join(timeout=15)
            flaky.delay = 0.0
            for sid, applied in (("slow", "may have been applied"), ("queued", "it was not applied")):
                r = answers[sid]
                assert r.status_code == 503 and "--request-timeout" in r.json()["error"], r.text
                assert applied in r.json()["error"]
            time.sleep(2.0)  # the stall ends; the engine goes on
            assert c.get("/v1/sessions/queued").json()["steps"] == 0  # cancelled before it ran: never ran
            assert c.post("/v1/sessions/queued/step", json={"inputs": {"tokens": [[2]]}}).json()["steps"] == 1
    finally:
        srv.stop()


def test_a_stopped_engine_answers_instead_of_queueing_forever(rt_lstm):
    from wmdeploy.serve.batcher import Batcher
    from wmdeploy.serve.jobs import StepJob
    from wmdeploy.serve.metrics import Metrics
    from wmdeploy.serve.sessions import SessionTable
    from wmdeploy.serve.validate import Overloaded

    batcher = Batcher(SessionTable(rt_lstm, 4, None, None, Metrics()))
    batcher.start()
    batcher.stop()
    with pytest.raises(Overloaded, match="not running"):
        batcher.enqueue(StepJob("a", {"tokens": np.array([[1]])}))
