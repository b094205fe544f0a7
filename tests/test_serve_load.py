"""`wmdeploy serve` under load: 200 interleaved sessions through the JSON API, each exactly its own results.

Threads with one ``httpx.Client`` each (httpx's AsyncClient spends ~5 ms per request at 200 concurrent
connections on this machine: it, not the server, would be what the test measures)."""
from __future__ import annotations

import re
import threading
import time

import httpx
import numpy as np

from _serve_server import ThreadServer
from wmdeploy.serve import ServeConfig

N_SESSIONS, STEPS = 200, 4


def test_200_interleaved_sessions_get_their_isolated_results(rt_lstm_path, rt_lstm):
    rng = np.random.default_rng(11)
    plans = {f"s{i:03d}": [rng.integers(0, 16, size=(1, int(rng.integers(1, 9)))) for _ in range(STEPS)]
             for i in range(N_SESSIONS)}
    pauses = {sid: rng.uniform(0, 0.004, STEPS).tolist() for sid in plans}  # shuffles the interleaving
    srv = ThreadServer(ServeConfig(rt_lstm_path, name="lm", max_sessions=N_SESSIONS + 8, batch_window_ms=3), rt_lstm)
    got: dict[str, list[np.ndarray]] = {}
    failures: list[str] = []
    start = threading.Barrier(N_SESSIONS)

    def session(sid: str) -> None:
        try:
            with srv.client() as c:
                start.wait(timeout=30)
                r = c.post("/v1/sessions", json={"id": sid})
                assert r.status_code == 201, r.text
                outs = []
                for tokens, pause in zip(plans[sid], pauses[sid]):
                    time.sleep(pause)
                    r = c.post(f"/v1/sessions/{sid}/step", json={"inputs": {"tokens": tokens.tolist()}})
                    assert r.status_code == 200, r.text
                    outs.append(np.asarray(r.json()["outputs"]["logits"], np.float32))
                got[sid] = outs
        except Exception as exc:  # noqa: BLE001  (reported by the main thread)
            failures.append(f"{sid}: {exc!r}")

    t0 = time.perf_counter()
    try:
        threads = [threading.Thread(target=session, args=(sid,)) for sid in plans]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        metrics = httpx.get(srv.url + "/metrics").text
    finally:
        srv.stop()
    assert not failures, failures[:3]
    assert time.perf_counter() - t0 < 20
    for sid, chunks in plans.items():
        alone = rt_lstm.stream()  # the isolated run of this session's chunks
        for tokens, out in zip(chunks, got[sid]):
            # batched matmuls round differently from batch 1: equal to float tolerance, not bit for bit
            np.testing.assert_allclose(out, alone.step(tokens=tokens)["logits"], rtol=1e-5, atol=1e-6)
    count = float(re.search(r"^wmdeploy_batch_size_count (\S+)$", metrics, re.M).group(1))
    assert count <= N_SESSIONS * STEPS / 2  # really batched: two or more sessions per engine round on average
    assert float(re.search(r"^wmdeploy_live_sessions (\S+)$", metrics, re.M).group(1)) == N_SESSIONS
