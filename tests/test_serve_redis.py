"""`wmdeploy serve --persist redis://...`: replicas that share sessions through a real Redis.

Every test here runs a real ``redis-server`` (Debian's package, installed by ``.ci/run``) on a free
loopback port with ``appendonly yes`` + ``appendfsync always``, and real ``wmdeploy serve`` subprocesses.
Three replicas and one Redis are shared by the module (starting them is most of the cost).
"""
from __future__ import annotations

import base64
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from _redis_server import RedisServer
from _serve_server import ProcessServer, free_port

pytest.importorskip("redis")
if shutil.which("redis-server") is None:
    pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does it)",
                allow_module_level=True)

K1, K2 = "key-one-0123456789", "key-two-0123456789"
H1, H2 = {"X-API-Key": K1}, {"X-API-Key": K2}


@pytest.fixture(scope="module")
def cluster(rt_lstm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("redis")
    redis_srv = RedisServer(tmp)
    args = ("--name", "lm", "--persist", redis_srv.url, "--api-key", K1, "--api-key", K2, "--batch-window-ms", "1")

    def start() -> ProcessServer:
        return ProcessServer(rt_lstm_path, *args, log=tmp / "replicas.log")

    replicas: list[ProcessServer] = []
    state = {"replicas": replicas, "redis": redis_srv, "start": start, "log": tmp / "replicas.log"}
    try:
        for _ in range(3):
            replicas.append(start())
        yield state
    finally:  # also when a replica failed to start: no redis-server outlives the tests
        for r in state["replicas"]:
            r.kill()
        redis_srv.kill()


def _step(url: str, sid: str, tokens: np.ndarray, headers: dict[str, str] = H1,
          client: httpx.Client | None = None) -> httpx.Response:
    body = {"inputs": {"tokens": tokens.tolist()}, "encoding": "base64"}
    return (client or httpx).post(f"{url}/v1/sessions/{sid}/step", json=body, headers=headers, timeout=30)


def _logits(resp: httpx.Response) -> np.ndarray:
    out = resp.json()["outputs"]["logits"]
    return np.frombuffer(base64.b64decode(out["base64"]), "<f4").reshape(out["shape"])


def test_round_robin_with_a_kill_9_is_bit_identical_to_local_streams(cluster, rt_lstm):
    replicas: list[ProcessServer] = list(cluster["replicas"])
    rng = np.random.default_rng(17)
    n_sessions, n_chunks = 8, 6
    chunks = {s: [rng.integers(0, 16, size=(1, int(rng.integers(1, 5))), dtype=np.int64) for _ in range(n_chunks)]
              for s in range(n_sessions)}
    want = {}
    for s in range(n_sessions):  # the reference: one local Stream per session, fed the same chunks
        local = rt_lstm.stream()
        want[s] = [local.step(tokens=ch)["logits"] for ch in chunks[s]]
    for s in range(n_sessions):
        r = httpx.post(replicas[s % 3].url + "/v1/sessions", json={"id": f"rr{s}"}, headers=H1)
        assert r.status_code == 201, r.text
    alive = list(replicas)
    for j in range(n_chunks):
        if j == n_chunks // 2:  # halfway: a replica dies with no shutdown at all
            replicas[1].kill()
            alive = [replicas[0], replicas[2]]
        for s in range(n_sessions):
            url = alive[(s + j) % len(alive)].url  # no affinity: consecutive chunks land on other replicas
            r = _step(url, f"rr{s}", chunks[s][j])
            assert r.status_code == 200, r.text
            assert r.json()["steps"] == j + 1
            np.testing.assert_array_equal(_logits(r), want[s][j])
    # the dead replica's place is taken by a fresh one, which knows every session from Redis alone
    cluster["replicas"][1] = fresh = cluster["start"]()
    listed = httpx.get(fresh.url + "/v1/sessions", headers=H1).json()["sessions"]
    assert {f"rr{s}" for s in range(n_sessions)} <= set(listed)
    info = httpx.get(fresh.url + "/v1/sessions/rr0", headers=H1).json()
    assert info["steps"] == n_chunks
    # a snapshot taken from any replica is the latest state, even where a stale copy is resident
    blob = httpx.get(replicas[0].url + "/v1/sessions/rr1/snapshot", headers=H1).content
    local = rt_lstm.stream()
    for ch in chunks[1]:
        local.step(tokens=ch)
    for name, arr in rt_lstm.stream(blob).state.items():
        np.testing.assert_array_equal(arr, local.state[name])


def test_triton_sequence_across_three_replicas_and_ownership(cluster, rt_lstm):
    tc = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException  # noqa: PLC0415

    urls = [r.url for r in cluster["replicas"]]
    rng = np.random.default_rng(3)
    chunks = [rng.integers(0, 16, size=(1, n), dtype=np.int64) for n in (3, 2, 4)]
    local = rt_lstm.stream()
    want = [local.step(tokens=ch)["logits"] for ch in chunks]
    for i, ch in enumerate(chunks):  # starts on one replica, continues on another, ends on a third
        client = tc.InferenceServerClient(urls[i].removeprefix("http://"))
        inp = tc.InferInput("tokens", list(ch.shape), "INT64")
        inp.set_data_from_numpy(ch)
        res = client.infer("lm", [inp], sequence_id=9001, sequence_start=i == 0, sequence_end=i == 2, headers=dict(H1))
        np.testing.assert_array_equal(res.as_numpy("logits"), want[i])
    # sequence_start is fresh memory whatever any replica holds: here on a replica whose copy is stale
    def infer(url: str, ch: np.ndarray, start: bool) -> np.ndarray:
        client = tc.InferenceServerClient(url.removeprefix("http://"))
        inp = tc.InferInput("tokens", list(ch.shape), "INT64")
        inp.set_data_from_numpy(ch)
        return client.infer("lm", [inp], sequence_id=9002, sequence_start=start, headers=dict(H1)).as_numpy("logits")

    fresh = [rt_lstm.stream().step(tokens=ch)["logits"] for ch in chunks]
    np.testing.assert_array_equal(infer(urls[1], chunks[0], True), fresh[0])
    local = rt_lstm.stream()
    local.step(tokens=chunks[0])
    np.testing.assert_array_equal(infer(urls[2], chunks[1], False), local.step(tokens=chunks[1])["logits"])
    np.testing.assert_array_equal(infer(urls[1], chunks[2], True), fresh[2])  # replica 1's copy was stale
    np.testing.assert_array_equal(infer(urls[0], chunks[0], True), fresh[0])
    # ended: the sequence is gone from every replica (also from the one that started it)
    client = tc.InferenceServerClient(urls[0].removeprefix("http://"))
    inp = tc.InferInput("tokens", [1, 1], "INT64")
    inp.set_data_from_numpy(np.array([[1]], np.int64))
    with pytest.raises(InferenceServerException, match="9001"):
        client.infer("lm", [inp], sequence_id=9001, headers=dict(H1))  # it adds to the dict
    # API-key ownership travels with the state: another key sees 404 on every replica
    assert httpx.post(urls[0] + "/v1/sessions", json={"id": "mine"}, headers=H1).status_code == 201
    for url in urls:
        assert _step(url, "mine", chunks[0], headers=H2).status_code == 404
        assert httpx.get(url + "/v1/sessions/mine", headers=H2).status_code == 404
        assert "mine" not in httpx.get(url + "/v1/sessions", headers=H2).json()["sessions"]
    assert _step(urls[2], "mine", chunks[0]).json()["steps"] == 1
    # creating an id that another replica holds is a 409 everywhere; DELETE on one removes it from all
    assert httpx.post(urls[1] + "/v1/sessions", json={"id": "mine"}, headers=H1).status_code == 409
    assert httpx.delete(urls[1] + "/v1/sessions/mine", headers=H1).status_code == 204
    assert _step(urls[2], "mine", chunks[0]).status_code == 404  # its stale resident copy is not used
    assert httpx.post(urls[0] + "/v1/sessions", json={"id": "gone"}, headers=H1).status_code == 201
    assert _step(urls[0], "gone", chunks[0]).status_code == 200  # resident on replica 0 ...
    assert httpx.delete(urls[1] + "/v1/sessions/gone", headers=H1).status_code == 204  # ... deleted via 1
    assert "gone" not in httpx.get(urls[0] + "/v1/sessions", headers=H1).json()["sessions"]
    assert httpx.get(urls[0] + "/v1/sessions/gone", headers=H1).status_code == 404
    assert httpx.delete(urls[0] + "/v1/sessions/gone", headers=H1).status_code == 404


def test_concurrent_steps_of_one_session_on_two_replicas_never_fork(cluster, rt_lstm):
    a, b = cluster["replicas"][0].url, cluster["replicas"][2].url
    assert httpx.post(a + "/v1/sessions", json={"id": "hot"}, headers=H1).status_code == 201
    chunk = np.array([[3, 1, 4]], np.int64)
    answers: list[tuple[int, int | None]] = []
    lock = threading.Lock()

    def hammer(url: str) -> None:
        with httpx.Client(timeout=30) as client:
            for _ in range(12):
                r = _step(url, "hot", chunk, client=client)
                with lock:
                    answers.append((r.status_code, r.json().get("steps")))

    threads = [threading.Thread(target=hammer, args=(u,)) for u in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted({c for c, _ in answers})
    assert set(codes) <= {200, 409}, codes  # the loser of a race is redone (or 409 after 8 tries); no 5xx
    acked = [n for c, n in answers if c == 200]
    assert len(acked) == len(set(acked)), "two acknowledged steps with the same step number: a fork"
    assert sorted(acked) == list(range(1, len(acked) + 1))  # consecutive: none lost
    r = _step(b, "hot", chunk)
    assert r.json()["steps"] == len(acked) + 1
    local = rt_lstm.stream()
    for _ in range(len(acked) + 1):
        out = local.step(tokens=chunk)["logits"]
    np.testing.assert_array_equal(_logits(r), out)  # every step applied once, to the latest state
    # the race did happen: steps computed on a stale copy were refused by Redis and redone
    retries = [_metric(u, 'wmdeploy_errors_total{kind="store_retry"}') for u in (a, b)]
    assert sum(retries) > 0, retries
    print(f"answers {sorted(set(c for c, _ in answers))}, acked {len(acked)}, redone {retries}")


def test_redis_killed_and_restarted_under_load(cluster, rt_lstm):
    urls = [cluster["replicas"][0].url, cluster["replicas"][1].url]
    sessions = [f"load{i}" for i in range(4)]
    for i, sid in enumerate(sessions):
        assert httpx.post(urls[i % 2] + "/v1/sessions", json={"id": sid}, headers=H1).status_code == 201
    chunks = {sid: np.array([[i + 1, 2 * i + 1]], np.int64) for i, sid in enumerate(sessions)}
    acked: dict[str, list[int]] = {sid: [] for sid in sessions}
    other: list[tuple[int, str]] = []
    phase = {"down": False, "restarted": False}
    after_restart = {sid: 0 for sid in sessions}
    stop = threading.Event()

    def client_loop(sid: str) -> None:  # one client per session, alternating replicas (no affinity)
        with httpx.Client(timeout=30) as client:
            n = 0
            while not stop.is_set():
                r = _step(urls[n % 2], sid, chunks[sid], client=client)
                n += 1
                if r.status_code == 200:
                    acked[sid].append(r.json()["steps"])
                    if phase["restarted"]:
                        after_restart[sid] += 1
                else:
                    other.append((r.status_code, r.json().get("error", "")))
                    time.sleep(0.02)

    threads = [threading.Thread(target=client_loop, args=(sid,)) for sid in sessions]
    for t in threads:
        t.start()
    try:
        _wait(lambda: all(len(v) >= 5 for v in acked.values()), "steps before the kill")
        cluster["redis"].kill()  # kill -9: only what appendfsync always wrote survives
        phase["down"] = True
        _wait(lambda: len(other) >= 4, "503s while Redis is down")
        cluster["redis"].start()  # same port, same AOF; the replicas are not touched
        phase["restarted"] = True
        _wait(lambda: all(v >= 5 for v in after_restart.values()), "steps after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert other, "no request failed while Redis was down"
    for code, error in other:
        assert code == 503, (code, error)
        assert cluster["redis"].url in error  # the answer names the store
    for sid, numbers in acked.items():
        # strictly increasing: no acknowledged step was lost (a lost one would give its number twice);
        # a step answered 503 may still have been applied (its reply was lost), hence gaps are allowed
        assert all(x < y for x, y in zip(numbers, numbers[1:])), (sid, numbers)
        info = httpx.get(urls[0] + f"/v1/sessions/{sid}", headers=H1).json()
        assert info["steps"] == numbers[-1]
        # no corruption: the stored memory is the local stream's after that many steps of the same chunk
        blob = httpx.get(urls[1] + f"/v1/sessions/{sid}/snapshot", headers=H1).content
        local = rt_lstm.stream()
        for _ in range(info["steps"]):
            local.step(tokens=chunks[sid])
        for name, arr in rt_lstm.stream(blob).state.items():
            # the replicas batch these sessions together: rounding may differ in the last bits
            np.testing.assert_allclose(arr, local.state[name], rtol=1e-5, atol=1e-6)
    texts = [httpx.get(u + "/metrics", headers=H1).text for u in urls]
    assert any('wmdeploy_errors_total{kind="persist"}' in t for t in texts)  # counted as the store's fault


def _metric(url: str, line: str) -> float:
    return _metric_of(httpx.get(url + "/metrics", headers=H1).text, line)


def _metric_of(text: str, line: str) -> float:
    for row in text.splitlines():
        if row.startswith(line + " "):
            return float(row.split()[-1])
    return 0.0


def _wait(cond: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---- the store alone (no replicas): fencing, idempotent retries, a forgotten script, an outage -------
def test_store_fences_stale_writes_and_survives_a_script_flush(cluster):
    from wmdeploy.serve.redis_store import RedisStore  # noqa: PLC0415

    url = cluster["redis"].url
    a, b = RedisStore(url, "unit"), RedisStore(url, "unit")
    try:
        assert a.create("k", b"s1") and not b.create("k", b"x")
        assert a.append([("k", b"s2")]) == set()
        assert b.append([("k", b"b?")]) == {"k"}  # b never read it: refused, and the refusal carries the latest
        trips = b.round_trips
        assert b.read("k") == b"s2" and b.round_trips == trips  # ... so the redo reads nothing
        assert b.append([("k", b"b3")]) == set()
        assert not a.current("k") and a.append([("k", b"a4")]) == {"k"}  # a's copy is stale now
        assert a.read("k") == b"b3"
        # a resent write (its reply was lost) is recognised by its write id, not taken for a conflict
        b._writes = iter([7, 7, 8, 9])  # type: ignore[assignment]
        assert b.append([("k", b"b4")]) == set()
        b._remember("k", b"1")  # as if the reply had been lost: b still believes in the old version
        assert b.append([("k", b"b4")]) == set()
        a._r.script_flush()  # Redis restarted without its script cache: loaded again, nothing lost
        assert a.read("k") == b"b4" and a.append([("k", b"a5")]) == set()
        a.remove("k")
        assert b.append([("k", b"b5")]) == {"k"} and b.read("k") is None  # deleted stays deleted
        assert a.keys() == [] and a.count() == 0
        ttl = RedisStore(url, "unit", ttl_s=0.2)  # --persist-ttl: Redis expires idle sessions by itself
        assert ttl.create("t", b"x") and ttl.keys() == ["t"]
        time.sleep(0.4)
        assert ttl.read("t") is None and ttl.keys() == [] and ttl.count() == 0  # the index is pruned too
        ttl.close()
    finally:
        a._r.delete(b"wm:unit:index")
        a.close()
        b.close()


def test_a_replica_is_a_cache_of_the_store_beyond_max_sessions(cluster, rt_lstm_path, rt_lstm):
    from _serve_server import ThreadServer  # noqa: PLC0415

    from wmdeploy.serve import ServeConfig  # noqa: PLC0415

    # in-process this time (create_app with a Redis URL), and with room for only 2 resident sessions: a
    # shared store holds them all, so the least recently used copy leaves memory instead of a 429
    srv = ThreadServer(ServeConfig(rt_lstm_path, name="lm", max_sessions=2, persist=cluster["redis"].url))
    try:
        with srv.client() as c:
            chunk = np.array([[5, 6]], np.int64)
            for rnd in range(2):
                for i in range(5):
                    if rnd == 0:
                        assert c.post("/v1/sessions", json={"id": f"cap{i}"}).status_code == 201
                    r = _step(srv.url, f"cap{i}", chunk, headers={}, client=c)
                    assert r.status_code == 200, r.text
                    assert r.json()["steps"] == rnd + 1
            local = rt_lstm.stream()
            local.step(tokens=chunk)
            np.testing.assert_array_equal(_logits(r), local.step(tokens=chunk)["logits"])
            assert _metric_of(c.get("/metrics").text, 'wmdeploy_evictions_total{reason="capacity"}') >= 8
            assert _metric_of(c.get("/metrics").text, "wmdeploy_persisted_sessions") >= 5
    finally:
        srv.stop()


def test_store_unreachable_is_a_503_error_naming_the_store_without_its_password():
    from wmdeploy.serve.persist import PersistError  # noqa: PLC0415
    from wmdeploy.serve.redis_store import RedisStore  # noqa: PLC0415

    port = free_port()  # nothing listens there
    store = RedisStore(f"redis://user:s3cret@127.0.0.1:{port}/2", "lm", timeout_s=0.5)
    with pytest.raises(PersistError, match=rf"--persist redis://127.0.0.1:{port}/2: the session store is unavailable"
                       ) as err:
        store.append([("k", b"x")])
    assert "s3cret" not in str(err.value)
    assert store.count() == -1  # the gauge says so instead of failing /metrics
