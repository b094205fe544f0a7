"""`wmdeploy serve --persist`: no acknowledged step is lost to kill -9; the serve path is torch-free."""
from __future__ import annotations

import json
import time
import subprocess
import sys
import textwrap

import httpx
import numpy as np
import pytest

from _serve_server import ProcessServer

def _v2_step(url: str, seq: object, tokens: np.ndarray, start: bool = False) -> np.ndarray:
    tc = pytest.importorskip("tritonclient.http")  # this test alone: the others in this file run without it
    client = tc.InferenceServerClient(url.removeprefix("http://"))
    inp = tc.InferInput("tokens", list(tokens.shape), "INT64")
    inp.set_data_from_numpy(tokens)
    return client.infer("lm", [inp], sequence_id=seq, sequence_start=start).as_numpy("logits")


def test_kill_9_and_restart_loses_no_acknowledged_step(rt_lstm_path, rt_lstm, tmp_path):
    rng = np.random.default_rng(6)
    chunks = [rng.integers(0, 16, size=(1, int(n)), dtype=np.int64) for n in (3, 1, 4, 2, 2, 5)]
    local = rt_lstm.stream()  # the uninterrupted reference
    want = [local.step(tokens=ch)["logits"] for ch in chunks]
    state = tmp_path / "state"
    args = ("--name", "lm", "--persist", str(state))
    srv = ProcessServer(rt_lstm_path, *args, log=tmp_path / "serve.log")
    try:
        for i, ch in enumerate(chunks[:3]):  # a Triton sequence ...
            np.testing.assert_array_equal(_v2_step(srv.url, 4242, ch, start=i == 0), want[i])
        r = httpx.post(srv.url + "/v1/sessions", json={"id": "json-one"})  # ... and a JSON session
        assert r.status_code == 201
        r = httpx.post(srv.url + "/v1/sessions/json-one/step", json={"inputs": {"tokens": chunks[0].tolist()}})
        assert r.status_code == 200
    finally:
        srv.kill()  # SIGKILL right after the last acknowledged step: no shutdown hook runs
    srv = ProcessServer(rt_lstm_path, *args, log=tmp_path / "serve.log")
    try:
        listed = httpx.get(srv.url + "/v1/sessions").json()["sessions"]
        assert set(listed) == {"4242", "json-one"}
        for i, ch in enumerate(chunks[3:], start=3):  # continue without sequence_start: bit-identical
            np.testing.assert_array_equal(_v2_step(srv.url, 4242, ch), want[i])
        r = httpx.post(srv.url + "/v1/sessions/json-one/step", json={"inputs": {"tokens": chunks[1].tolist()}})
        assert r.json()["steps"] == 2
        np.testing.assert_array_equal(np.asarray(r.json()["outputs"]["logits"], np.float32), want[1])
    finally:
        srv.kill()


BLOCKER = textwrap.dedent("""
    import sys
    class _Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "onnx", "onnxscript", "onnxslim"):
                raise ImportError(f"{name} is blocked in this edge-install test")
            return None
    sys.meta_path.insert(0, _Blocked())
""")


def test_serve_path_is_torch_free(rt_lstm_path):
    code = BLOCKER + textwrap.dedent(f"""
        import json, sys
        from fastapi.testclient import TestClient
        from wmdeploy.serve import ServeConfig, create_app
        app = create_app(ServeConfig({str(rt_lstm_path)!r}, name="lm"))
        with TestClient(app) as c:
            c.post("/v1/sessions", json={{"id": "a"}})
            r = c.post("/v1/sessions/a/step", json={{"inputs": {{"tokens": [[1, 2]]}}}})
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "onnxscript"))
        print(json.dumps({{"status": r.status_code, "heavy": heavy}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"status": 200, "heavy": []}


def test_state_log_cuts_a_torn_tail_and_compacts(tmp_path, rt_lstm):
    """A crash in the middle of an append leaves a torn record: it is dropped; earlier records survive."""
    from wmdeploy.serve.persist import LOG_NAME, StateLog

    s = rt_lstm.stream()
    snaps = []
    for n in (1, 2, 3):
        s.step(tokens=np.full((1, n), n, np.int64))
        snaps.append(s.snapshot())
    log = StateLog(tmp_path, compact_min_bytes=1)  # compacts whenever the file outgrows 4x its live bytes
    log.append([("a", snaps[0]), ("b", snaps[0])])
    log.append([("a", snaps[1]), ("b", None)])  # b deleted (tombstone)
    log.append([("a", snaps[2])])
    log.close()
    with open(tmp_path / LOG_NAME, "ab") as f:  # half a record: what kill -9 during a write leaves
        f.write(StateLog._record("a", snaps[0])[:50])
    log = StateLog(tmp_path)
    assert log.keys() == ["a"] and log.read("a") == snaps[2] and log.read("b") is None
    for _ in range(10):
        log.append([("a", snaps[1])])
    log.compact()
    assert (tmp_path / LOG_NAME).stat().st_size < 2 * len(snaps[1]) and log.read("a") == snaps[1]
    log.close()


def test_state_log_refuses_a_damaged_record_in_the_middle(tmp_path, rt_lstm):
    """A crash tears only the last write; damage with valid records after it is not a torn tail, and
    truncating there would silently drop acknowledged sessions: the log refuses to open instead."""
    from wmdeploy.serve.persist import LOG_NAME, PersistError, StateLog

    s = rt_lstm.stream()
    s.step(tokens=np.array([[1, 2]]))
    log = StateLog(tmp_path)
    log.append([("a", s.snapshot())])
    log.append([("b", s.snapshot())])
    log.close()
    raw = bytearray((tmp_path / LOG_NAME).read_bytes())
    raw[40] ^= 0xFF  # one flipped bit inside record "a"
    (tmp_path / LOG_NAME).write_bytes(bytes(raw))
    with pytest.raises(PersistError, match="damaged record at byte 0 .* refusing to drop acknowledged sessions"):
        StateLog(tmp_path)
    assert (tmp_path / LOG_NAME).stat().st_size == len(raw)  # nothing was cut


def test_sigterm_drains_in_flight_steps_and_restart_continues_exactly(rt_lstm_path, rt_lstm, tmp_path):
    """SIGTERM while steps wait in a batch window: each is answered (and durable), the process exits 0, and a
    restart on the same --persist holds exactly the answered state, still owned by the same API key."""
    import threading

    from wmdeploy import snapshot as snap

    state, alice, bob = tmp_path / "state", {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}
    keys = ("--api-key", "alice", "--api-key", "bob")
    srv = ProcessServer(rt_lstm_path, "--name", "lm", "--persist", str(state), "--batch-window-ms", "500", *keys,
                        log=tmp_path / "serve.log")
    sids = [f"drain{i}" for i in range(3)]
    answers: dict[str, httpx.Response] = {}
    try:
        for sid in sids + ["idle"]:  # an extra session that stepped lately: the batch waits its window for it
            assert httpx.post(srv.url + "/v1/sessions", json={"id": sid}, headers=alice).status_code == 201

        def step(i: int, sid: str) -> None:  # a KServe step that also asks for the state it leaves behind
            body = {"inputs": [{"name": "tokens", "shape": [1, 2], "datatype": "INT64", "data": [i, i + 3]}],
                    "outputs": [{"name": n} for n in ("logits", "h_out", "c_out")], "parameters": {"sequence_id": sid}}
            answers[sid] = httpx.post(srv.url + "/v2/models/lm/infer", json=body, headers=alice, timeout=30)

        threads = [threading.Thread(target=step, args=(i, sid)) for i, sid in enumerate(sids)]
        for t in threads:
            t.start()
        time.sleep(0.2)  # the steps are in flight: queued in the engine's 500 ms batch window
        assert not answers
        code = srv.terminate()
        for t in threads:
            t.join(timeout=30)
    finally:
        srv.kill()
    assert code == 0
    assert {sid: r.status_code for sid, r in answers.items()} == {sid: 200 for sid in sids}
    srv = ProcessServer(rt_lstm_path, "--name", "lm", "--persist", str(state), *keys, log=tmp_path / "serve.log")
    try:
        assert httpx.get(srv.url + "/v1/sessions", headers=bob).json()["sessions"] == []
        for i, sid in enumerate(sids):
            outs = {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in answers[sid].json()["outputs"]}
            blob = httpx.get(srv.url + f"/v1/sessions/{sid}/snapshot", headers=alice).content
            held = snap.loads(rt_lstm.spec, blob)
            np.testing.assert_array_equal(held["h"], outs["h_out"])  # exactly the state that was answered
            np.testing.assert_array_equal(held["c"], outs["c_out"])
            local = rt_lstm.stream(blob)
            r = httpx.post(srv.url + f"/v1/sessions/{sid}/step", json={"inputs": {"tokens": [[i, 1, 2]]}}, headers=alice)
            assert r.json()["steps"] == 2
            np.testing.assert_array_equal(np.asarray(r.json()["outputs"]["logits"], np.float32),
                                          local.step(tokens=np.array([[i, 1, 2]]))["logits"])
    finally:
        srv.kill()
