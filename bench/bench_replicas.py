"""What sharing sessions through Redis costs: `wmdeploy serve` with no store, `--persist DIR`, and
`--persist redis://...` (one replica; two replicas with affinity and round-robin), on the zoo's 2 x 1024 LSTM LM.

    python bench/bench_replicas.py [--model M.onnx] [--steps 10] [--rounds 3] [--json bench/results/replicas.json]

Measured in one run, servers, Redis and the load generator on this machine (the ratios are what to
compare: the machine is shared and noisy, so the configurations are measured in interleaved rounds and
each row is the median round):

* **1 and 64 sessions x chunk 8**: every session streams chunks of 8 tokens through the JSON session API,
  one request at a time; aggregate tokens/s, request latency p50/p99, and the store's time per batch
  (``wmdeploy_persist_seconds``: the fsync of the local log, or the one Redis round trip);
* configurations: **none** (no store), **dir** (``--persist DIR``: one append + fsync per batch),
  **redis always** / **redis everysec** (one replica, so every session has affinity; Redis with
  ``appendonly yes`` and that ``appendfsync``), **2 replicas affinity** (session i always on replica
  i mod 2) and **2 replicas round-robin** (step k of session i on replica (i + k) mod 2: every step finds
  a stale copy, is refused by Redis and redone on the latest state the refusal carried);
* the acceptance ratio: throughput of --persist DIR / redis always at 64 sessions (must be <= 1.3).

Needs ``redis-server`` on PATH (Debian: ``apt-get install redis-server``) and the [redis] extra.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _serve_proc import ZOO, Conn, Server, drive, export_zoo, free_port, metric  # noqa: E402  (bench/ is on sys.path)


class Redis:
    def __init__(self, directory: Path) -> None:
        import redis  # noqa: PLC0415

        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                                      str(directory), "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.client.ping()
                return
            except redis.exceptions.RedisError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def fsync(self, mode: str) -> None:
        self.client.config_set("appendfsync", mode)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def stream(servers: list[Server], sessions: int, chunk: int, steps: int, round_robin: bool,
                 warmup: int = 2) -> tuple[float, list[float]]:
    """Every session streams ``steps`` chunks, one request at a time; session i lives on replica i mod R
    (affinity) or its step k goes to replica (i + k) mod R (round-robin). Returns (wall s, latencies)."""
    rng = np.random.default_rng(0)
    conns = [[await Conn.open(s.port) for s in servers] for _ in range(sessions)]
    ids = []
    for i, per in enumerate(conns):
        status, body = await per[i % len(servers)].post_json("/v1/sessions", {})
        assert status == 201, body
        ids.append(json.loads(body)["id"])

    async def step(i: int, k: int, last: bool) -> None:
        conn = conns[i][(i + k) % len(servers) if round_robin else i % len(servers)]
        tokens = rng.integers(0, 256, size=(1, chunk)).tolist()
        status, body = await conn.post_json(f"/v1/sessions/{ids[i]}/step", {"inputs": {"tokens": tokens}})
        assert status == 200, body[:200]
        json.loads(body)

    wall, lat = await drive(sessions, steps, warmup, step)
    for i, per in enumerate(conns):
        await per[0].post_json(f"/v1/sessions/{ids[i]}", None, b"DELETE")
        for c in per:
            c.close()
    return wall, lat


def measure(servers: list[Server], sessions: int, steps: int, round_robin: bool = False) -> dict[str, float]:
    keys = ("wmdeploy_batch_size_count", "wmdeploy_batch_size_sum", "wmdeploy_persist_seconds_sum",
            "wmdeploy_compute_seconds_sum", 'wmdeploy_errors_total{kind="store_retry"}')
    before = [s.metrics() for s in servers]
    wall, lat = asyncio.run(stream(servers, sessions, 8, steps, round_robin))
    after = [s.metrics() for s in servers]
    d = {k: sum(metric(a, k, 0.0) - metric(b, k, 0.0) for a, b in zip(after, before)) for k in keys}
    batches = max(d["wmdeploy_batch_size_count"], 1)
    ms = np.asarray(lat) * 1e3
    return {"tokens_per_s": sessions * steps * 8 / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_batch": d["wmdeploy_batch_size_sum"] / batches,
            "store_ms_per_batch": 1e3 * d["wmdeploy_persist_seconds_sum"] / batches,
            "compute_ms_per_batch": 1e3 * d["wmdeploy_compute_seconds_sum"] / batches,
            "redone_per_step": d['wmdeploy_errors_total{kind="store_retry"}'] / (sessions * steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help=f"default: the zoo's {ZOO}, exported here")
    ap.add_argument("--steps", type=int, default=10, help="timed chunks per session per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each row is the median round")
    ap.add_argument("--json", default="bench/results/replicas.json")
    args = ap.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not on PATH (apt-get install redis-server)")
    tmp = Path(tempfile.mkdtemp(prefix="bench_replicas_"))
    model = args.model
    if model is None:
        model = tmp / f"{ZOO}.onnx"
        export_zoo(model)
    redis_srv = Redis(tmp)
    started: list[Server] = []
    try:
        none = Server(model, "--max-sessions", "300")
        local = Server(model, "--max-sessions", "300", "--persist", str(tmp / "state"))
        shared = [Server(model, "--max-sessions", "300", "--persist", redis_srv.url) for _ in range(2)]
        started += [none, local, *shared]
        # (label, servers, round robin, Redis appendfsync or None)
        configs = [("none", [none], False, None), ("dir", [local], False, None),
                   ("redis always", shared[:1], False, "always"), ("redis everysec", shared[:1], False, "everysec"),
                   ("2 replicas affinity", shared, False, "always"), ("2 replicas round-robin", shared, True, "always")]
        runs: dict[tuple[str, int], list[dict[str, float]]] = {}
        for rnd in range(args.rounds):
            for n in (1, 64):
                for label, servers, rr, fsync in configs:
                    if fsync is not None:
                        redis_srv.fsync(fsync)
                    row = measure(servers, n, args.steps, rr)
                    runs.setdefault((label, n), []).append(row)
                    print(f"  round {rnd + 1} {label:<24} {n:>2} sessions: {row['tokens_per_s']:>8,.0f} tok/s "
                          f"p50 {row['p50_ms']:.1f} ms", file=sys.stderr)
    finally:
        for s in started:
            s.stop()
        redis_srv.stop()
    # each number is the median over rounds; a ratio is the median of the ratios measured in the same
    # round (same machine load), not a ratio of medians taken from different rounds
    rows = []
    for (label, n), rs in runs.items():
        row: dict[str, Any] = {"config": label, "sessions": n}
        for k in rs[0]:
            row[k] = statistics.median(r[k] for r in rs)
        row["tokens_per_s_rounds"] = [r["tokens_per_s"] for r in rs]
        for base in ("dir", "none"):
            row[f"x_{base}"] = statistics.median(r["tokens_per_s"] / b["tokens_per_s"]
                                                 for r, b in zip(rs, runs[(base, n)]))
        rows.append(row)
    by = {(r["config"], r["sessions"]): r for r in rows}
    per_round = [d["tokens_per_s"] / r["tokens_per_s"] for d, r in zip(runs[("dir", 64)], runs[("redis always", 64)])]
    summary = {"dir_over_redis_always_64": statistics.median(per_round), "per_round": per_round, "target": 1.3,
               "dir_over_redis_everysec_64": 1 / by[("redis everysec", 64)]["x_dir"],
               "affinity_over_round_robin_64": statistics.median(
                   a["tokens_per_s"] / r["tokens_per_s"]
                   for a, r in zip(runs[("2 replicas affinity", 64)], runs[("2 replicas round-robin", 64)]))}
    head = (f"{'configuration':<24} {'sess':>4} {'tok/s':>8} {'x dir':>6} {'x none':>6} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'batch':>5} {'store ms/b':>10} {'redone/step':>11}")
    print(head)
    print("-" * len(head))
    for r in sorted(rows, key=lambda r: (r["sessions"], [c[0] for c in configs].index(r["config"]))):
        print(f"{r['config']:<24} {r['sessions']:>4} {r['tokens_per_s']:>8,.0f} {r['x_dir']:>6.2f} {r['x_none']:>6.2f} "
              f"{r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['mean_batch']:>5.1f} {r['store_ms_per_batch']:>10.2f} "
              f"{r['redone_per_step']:>11.2f}")
    ok = summary["dir_over_redis_always_64"] <= 1.3
    print(f"64 sessions: --persist DIR / redis (appendfsync always, affinity) throughput = "
          f"{summary['dir_over_redis_always_64']:.2f} (median of rounds {', '.join(f'{x:.2f}' for x in per_round)}; "
          f"target <= 1.3: {'met' if ok else 'NOT met'}); everysec {summary['dir_over_redis_everysec_64']:.2f}; "
          f"2 replicas affinity / round-robin {summary['affinity_over_round_robin_64']:.2f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                           "python": platform.python_version(), "load": os.getloadavg()},
                               "model": ZOO if args.model is None else str(model), "summary": summary, "rows": rows},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
