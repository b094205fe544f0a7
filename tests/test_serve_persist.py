"""The --persist state log stays bounded: a TTL for persisted sessions (with a metric), compaction that
streams records (memory bounded by one snapshot, not the log), O(1) bookkeeping per append, and a
compaction that fails (a full disk) costs nothing but the compaction."""
from __future__ import annotations

import re
import struct
import time
import tracemalloc
import zlib

import numpy as np

from _serve_server import ThreadServer
from wmdeploy.serve import ServeConfig
from wmdeploy.serve.persist import LOG_NAME, StateLog


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_compaction_streams_records_with_bounded_memory(tmp_path):
    n, size = 48, 96 << 10  # 4.5 MiB of live snapshots, written twice
    log = StateLog(tmp_path, compact_min_bytes=1 << 40)  # compaction only when asked
    rng = np.random.default_rng(0)
    latest = {}
    for round_ in range(2):
        for i in range(n):
            latest[f"k{i}"] = rng.integers(0, 255, size, dtype=np.uint8).tobytes()
            log.append([(f"k{i}", latest[f"k{i}"])])
    tracemalloc.start()
    try:
        log.compact()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 << 20, f"compaction held {peak / 2**20:.1f} MiB for {n * size / 2**20:.1f} MiB of records"
    assert (tmp_path / LOG_NAME).stat().st_size < n * (size + 64)
    assert all(log.read(k) == v for k, v in latest.items())
    log.close()
    again = StateLog(tmp_path)
    assert sorted(again.keys()) == sorted(latest) and all(again.read(k) == v for k, v in latest.items())
    again.close()


class _CountingDict(dict):
    """An index that counts whole-index walks (what an append must not do)."""

    walks = 0

    def values(self):  # type: ignore[override]
        _CountingDict.walks += 1
        return super().values()

    def items(self):  # type: ignore[override]
        _CountingDict.walks += 1
        return super().items()

    def __iter__(self):  # type: ignore[override]
        _CountingDict.walks += 1
        return super().__iter__()


def test_an_append_does_not_walk_the_index(tmp_path):
    log = StateLog(tmp_path, compact_min_bytes=1 << 40)
    log.append([(f"s{i}", b"x" * 100) for i in range(2000)])
    log.index = _CountingDict(log.index)
    for i in range(200):
        log.append([(f"s{i}", b"y" * (50 + i))])
    assert _CountingDict.walks == 0
    assert log.live_bytes == sum(n for _, n in dict.values(log.index))  # the running sum is right
    log.close()


def test_a_failed_compaction_keeps_the_log_and_appends_go_on(tmp_path):
    """The temp file cannot be made (here: a directory is in its way; on a full disk: ENOSPC): the append
    that triggered compaction is still durable, the log is intact, and compaction is retried later."""
    (tmp_path / "sessions.tmp").mkdir()
    log = StateLog(tmp_path, compact_min_bytes=1)  # compacts whenever the file outgrows 4x its live bytes
    for i in range(20):
        log.append([("a", bytes([i]) * 64)])  # would compact (and fail) on the way
    assert log.read("a") == bytes([19]) * 64
    log.close()
    (tmp_path / "sessions.tmp").rmdir()
    log = StateLog(tmp_path, compact_min_bytes=1)
    assert log.read("a") == bytes([19]) * 64
    log.append([("a", b"z" * 64)])
    assert (tmp_path / LOG_NAME).stat().st_size < 2 * 100  # the retry compacted
    log.close()


def test_expiry_and_the_first_record_format(tmp_path):
    # a log written before records carried a time (b"WMLR"): read, and counted as written at open
    key, data = b"old", b"snapshot-bytes"
    body = struct.pack("<4sIQ", b"WMLR", len(key), len(data)) + key + data
    (tmp_path / LOG_NAME).write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    opened = time.time()
    log = StateLog(tmp_path)
    assert log.read("old") == data and log.written_at("old") >= opened - 1
    log.append([("new", b"n" * 10)])
    assert log.expire(opened - 60) == []  # nothing that old
    assert log.expire(log.written_at("new")) == ["old"]  # older than "new"'s write: only "old"
    assert log.keys() == ["new"]
    log.close()
    log = StateLog(tmp_path)  # the tombstone and the times survive a restart
    assert log.keys() == ["new"] and abs(log.written_at("new") - opened) < 60
    log.close()


def test_persist_ttl_deletes_idle_sessions_with_a_metric(rt_lstm_path, rt_lstm, tmp_path):
    state = tmp_path / "state"
    srv = ThreadServer(ServeConfig(rt_lstm_path, name="lm", persist=state, persist_ttl=0.6), rt_lstm)
    try:
        with srv.client() as c:
            for sid in ("idle", "busy"):
                assert c.post("/v1/sessions", json={"id": sid}).status_code == 201
            for _ in range(10):  # "busy" steps every 0.15 s, "idle" never again
                assert c.post("/v1/sessions/busy/step", json={"inputs": {"tokens": [[1]]}}).status_code == 200
                time.sleep(0.15)
            r = c.post("/v1/sessions/idle/step", json={"inputs": {"tokens": [[1]]}})
            assert r.status_code == 404 and "--persist-ttl" in r.json()["error"], r.text
            assert c.get("/v1/sessions").json()["sessions"] == ["busy"]
            text = c.get("/metrics").text
            assert _metric(text, "wmdeploy_expired_sessions_total") == 1
            assert _metric(text, "wmdeploy_persisted_sessions") == 1
    finally:
        srv.stop()
    log = StateLog(state)  # expired for good: not back after a restart
    assert log.keys() == ["busy"]
    log.close()
