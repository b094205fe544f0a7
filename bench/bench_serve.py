"""Benchmark `wmdeploy serve` against the engine's own ceiling, on the zoo's 2 x 1024 LSTM LM.

    python bench/bench_serve.py [--model M.onnx] [--steps 12] [--json bench/results/serve.json]

Measured in one run, server and load generator on this machine (ratios are what to compare: the machine
is shared and noisy):

* **ceiling**: 64 x 8 tokens / (one raw ``onnxruntime.InferenceSession.run`` at batch 64, chunk 8);
* **N sessions x chunk 8** (N = 1, 8, 64): every session streams chunks of 8 tokens through the JSON
  session API, one request at a time; aggregate tokens/s, its ratio to the ceiling and to 1 session,
  request latency p50/p99. Outputs as nested JSON lists (the default) and as ``"encoding": "base64"``;
  64 sessions also with ``--persist`` (one fsync per batch);
* **chunk 1, one session**: request latency over HTTP and over the WebSocket, and the per-request cost
  that is ours = latency - the engine's compute time for that step (``wmdeploy_compute_seconds``);
* **KServe v2 wires** at N = 1, 8, 64 sequences x chunk 8 (``_serve_wires.py``): HTTP JSON, HTTP binary
  tensors, gRPC ``ModelInfer`` (``--grpc-port``) and one gRPC ``ModelStreamInfer`` stream carrying every
  sequence; the summary gives gRPC at 64 x 8 against the ceiling (target: at least 0.7x).

Each configuration runs a fresh ``wmdeploy serve`` subprocess. The load generator is one asyncio loop
with one keep-alive connection per session, speaking HTTP/1.1 over raw streams (like ``wrk``: a Python
HTTP client costs more per request than the server does, and it shares the 2 cores).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import _serve_wires as wires  # noqa: E402  (bench/ is on sys.path when this script runs)
from _serve_proc import ZOO, Conn, Server, drive, export_zoo, metric  # noqa: E402

def engine_ceiling(model: Path, batch: int, chunk: int, repeats: int = 12) -> float:
    """Median seconds of one raw InferenceSession.run (default options) at this batch and chunk."""
    import onnxruntime as ort  # noqa: PLC0415

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        shape = [batch if d == "batch" else chunk if isinstance(d, str) else d for d in i.shape]
        feeds[i.name] = np.zeros(shape, np.int64 if "int64" in i.type else np.float32)
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


async def stream_sessions(port: int, sessions: int, chunk: int, steps: int, encoding: str,
                          warmup: int = 2) -> tuple[float, list[float]]:
    """Every session streams ``steps`` chunks, one request at a time; returns (wall seconds, latencies)."""
    rng = np.random.default_rng(0)
    conns = [await Conn.open(port) for _ in range(sessions)]
    ids = []
    for c in conns:
        status, body = await c.post_json("/v1/sessions", {})
        assert status == 201, body
        ids.append(json.loads(body)["id"])

    async def step(i: int, k: int, last: bool) -> None:
        tokens = rng.integers(0, 256, size=(1, chunk)).tolist()
        status, body = await conns[i].post_json(f"/v1/sessions/{ids[i]}/step", {"inputs": {"tokens": tokens}, "encoding": encoding})
        assert status == 200, body[:200]
        json.loads(body)  # a client reads its answer: part of the cost

    wall, lat = await drive(sessions, steps, warmup, step)
    for c, sid in zip(conns, ids):  # done: the sessions go (they would count as active for a while)
        await c.post_json(f"/v1/sessions/{sid}", None, b"DELETE")
        c.close()
    return wall, lat


async def websocket_chunk1(port: int, steps: int) -> list[float]:
    from websockets.asyncio.client import connect  # noqa: PLC0415

    conn = await Conn.open(port)
    _, body = await conn.post_json("/v1/sessions", {})
    sid = json.loads(body)["id"]
    conn.close()
    lat = []
    async with connect(f"ws://127.0.0.1:{port}/v1/sessions/{sid}/stream") as ws:
        for k in range(steps + 5):
            t0 = time.perf_counter()
            await ws.send(json.dumps({"inputs": {"tokens": [[k % 256]]}}))
            json.loads(await ws.recv())
            if k >= 5:
                lat.append(time.perf_counter() - t0)
    return lat


def measure(srv: Server, label: str, sessions: int, chunk: int, steps: int, encoding: str = "json",
            wire: str = "session API") -> dict[str, Any]:
    before = srv.metrics()
    if wire == "session API":
        wall, lat = asyncio.run(stream_sessions(srv.port, sessions, chunk, steps, encoding))
    elif wire.startswith("v2 HTTP"):
        wall, lat = asyncio.run(wires.v2_http(srv.port, sessions, chunk, steps, binary=wire == "v2 HTTP binary"))
    else:
        wall, lat = asyncio.run(wires.v2_grpc(srv.grpc_port, sessions, chunk, steps, stream="stream" in wire,
                                              depth=wires.PIPELINE_DEPTH if "in flight" in wire else 1))
    after = srv.metrics()
    d = {k: metric(after, k) - metric(before, k) for k in (
        "wmdeploy_batch_size_count", "wmdeploy_batch_size_sum", "wmdeploy_compute_seconds_sum",
        "wmdeploy_queue_seconds_sum", "wmdeploy_persist_seconds_sum")}
    ms = np.asarray(lat) * 1e3
    batches = max(d["wmdeploy_batch_size_count"], 1)
    row = {"config": label, "wire": wire, "sessions": sessions, "chunk": chunk, "encoding": encoding,
           "tokens_per_s": sessions * steps * chunk / wall, "p50_ms": float(np.percentile(ms, 50)),
           "p99_ms": float(np.percentile(ms, 99)),
           "mean_batch": d["wmdeploy_batch_size_sum"] / batches,
           "compute_ms_per_batch": 1e3 * d["wmdeploy_compute_seconds_sum"] / batches,
           "compute_share": d["wmdeploy_compute_seconds_sum"] / wall,
           "queue_ms_per_step": 1e3 * d["wmdeploy_queue_seconds_sum"] / max(d["wmdeploy_batch_size_sum"], 1)}
    if d["wmdeploy_persist_seconds_sum"] > 0:
        row["persist_ms_per_batch"] = 1e3 * d["wmdeploy_persist_seconds_sum"] / batches
    print(f"  {label}: {row['tokens_per_s']:,.0f} tok/s, p50 {row['p50_ms']:.1f} ms", file=sys.stderr)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help=f"default: the zoo's {ZOO}, exported here")
    ap.add_argument("--steps", type=int, default=12, help="timed chunks per session")
    ap.add_argument("--json", default="bench/results/serve.json")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of (ceiling, every wire at 64 x 8)")
    ap.add_argument("--serve-args", default="", help="extra `wmdeploy serve` flags, e.g. '--batch-window-ms 10'")
    ap.add_argument("--openai", action="store_true", help="the OpenAI rows instead (bench_openai.py: a language "
                                                          "model, 32 concurrent chat streams, multi-turn caching)")
    args, rest = ap.parse_known_args()
    if args.openai:
        import bench_openai  # noqa: PLC0415

        sys.argv = [sys.argv[0], *rest]
        sys.exit(bench_openai.main())
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    model = args.model
    if model is None:
        model = tmp / f"{ZOO}.onnx"
        export_zoo(model)
    raw64 = engine_ceiling(model, 64, 8)
    raw1_8, raw1_1 = engine_ceiling(model, 1, 8), engine_ceiling(model, 1, 1, repeats=50)
    ceiling = 64 * 8 / raw64
    print(f"  engine: batch 64 x chunk 8 {raw64 * 1e3:.1f} ms -> ceiling {ceiling:,.0f} tok/s", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    srv = Server(model, "--max-sessions", "300", *args.serve_args.split(), grpc=True)
    rounds: list[dict[str, Any]] = []
    try:
        for n in (1, 8, 64):
            rows.append(measure(srv, f"{n} sessions x chunk 8", n, 8, args.steps))
        rows.append(measure(srv, "64 sessions x chunk 8, base64 outputs", 64, 8, args.steps, "base64"))
        for wire in wires.WIRES:  # KServe v2 on every wire, into the same batcher
            for n in (1, 8, 64):
                rows.append(measure(srv, f"{wire}, {n} seq x chunk 8", n, 8, args.steps, wire=wire))
        rows.append(measure(srv, "1 session x chunk 1 (HTTP)", 1, 1, 200))
        http1 = rows[-1]
        before = srv.metrics()
        ws_lat = asyncio.run(websocket_chunk1(srv.port, 200))
        after = srv.metrics()
        compute = (metric(after, "wmdeploy_compute_seconds_sum") - metric(before, "wmdeploy_compute_seconds_sum")) / \
            (metric(after, "wmdeploy_batch_size_count") - metric(before, "wmdeploy_batch_size_count"))
        ms = np.asarray(ws_lat) * 1e3
        rows.append({"config": "1 session x chunk 1 (WebSocket)", "wire": "WebSocket", "sessions": 1, "chunk": 1, "encoding": "json",
                     "tokens_per_s": len(ws_lat) / (ms.sum() / 1e3), "p50_ms": float(np.percentile(ms, 50)),
                     "p99_ms": float(np.percentile(ms, 99)), "mean_batch": 1.0, "compute_ms_per_batch": compute * 1e3})
        # the machine is shared: the engine's speed moves between rows measured minutes apart. So the 64 x 8
        # comparison also runs in interleaved rounds, each wire against the ceiling measured just before it
        for r in range(args.rounds):
            ceil_r = 64 * 8 / engine_ceiling(model, 64, 8, repeats=5)
            for wire in ("session API", *wires.WIRES):
                row = measure(srv, f"round {r + 1}: {wire}, 64 x 8", 64, 8, args.steps, wire=wire)
                rounds.append({"round": r + 1, "wire": wire, "ceiling_tokens_per_s": ceil_r,
                               "tokens_per_s": row["tokens_per_s"], "x_ceiling": row["tokens_per_s"] / ceil_r,
                               "mean_batch": row["mean_batch"], "compute_share": row["compute_share"]})
    finally:
        srv.stop()
    srv = Server(model, "--max-sessions", "300", "--persist", str(tmp / "state"), *args.serve_args.split(), grpc=True)
    try:
        rows.append(measure(srv, "64 sessions x chunk 8, --persist", 64, 8, args.steps))
    finally:
        srv.stop()
    ones = {r["wire"]: r["tokens_per_s"] for r in reversed(rows) if r["sessions"] == 1 and r["chunk"] == 8}
    for r in rows:
        r["x_ceiling"] = r["tokens_per_s"] / ceiling
        r["x_1_session"] = r["tokens_per_s"] / ones[r["wire"]] if r["chunk"] == 8 and r.get("wire") in ones else None
    for r in rows:
        if r["chunk"] == 1:  # what is ours per request: latency less the engine's time for that step
            r["overhead_ms_per_request"] = r["p50_ms"] - r["compute_ms_per_batch"]
    persist = next(r for r in rows if "--persist" in r["config"])
    plain = next(r for r in rows if r["config"] == "64 sessions x chunk 8")
    summary = {"ceiling_tokens_per_s": ceiling, "raw_ms": {"batch64_chunk8": raw64 * 1e3, "batch1_chunk8": raw1_8 * 1e3,
                                                           "batch1_chunk1": raw1_1 * 1e3},
               "persist_throughput_cost": 1 - persist["tokens_per_s"] / plain["tokens_per_s"],
               "http_chunk1_overhead_ms": http1["overhead_ms_per_request"],
               "ws_chunk1_overhead_ms": rows[-2]["overhead_ms_per_request"],
               "x_ceiling_64x8": {r["wire"]: r["x_ceiling"] for r in rows if r["sessions"] == 64 and r["chunk"] == 8
                                  and r["encoding"] == "json" and "--persist" not in r["config"]},
               "grpc_target_x_ceiling": 0.7,
               "x_ceiling_64x8_rounds_median": {w: float(np.median([r["x_ceiling"] for r in rounds if r["wire"] == w]))
                                                for w in ("session API", *wires.WIRES)} if rounds else {}}
    head = (f"{'configuration':<42} {'tok/s':>8} {'x ceil':>7} {'x 1 s.':>7} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} "
            f"{'ours ms/req':>11}")
    print(f"engine ceiling: 64 x 8 / {raw64 * 1e3:.1f} ms = {ceiling:,.0f} tok/s  (raw batch 1: chunk 8 "
          f"{raw1_8 * 1e3:.2f} ms, chunk 1 {raw1_1 * 1e3:.2f} ms)")
    print(head)
    print("-" * len(head))
    for r in rows:
        x1 = f"{r['x_1_session']:.2f}" if r["x_1_session"] is not None else "-"
        ours = f"{r['overhead_ms_per_request']:.2f}" if "overhead_ms_per_request" in r else "-"
        print(f"{r['config']:<42} {r['tokens_per_s']:>8,.0f} {r['x_ceiling']:>7.2f} {x1:>7} {r['p50_ms']:>8.1f} "
              f"{r['p99_ms']:>8.1f} {r['mean_batch']:>6.1f} {ours:>11}")
    x64 = summary["x_ceiling_64x8"]
    print("64 sequences x chunk 8 against the engine's own batch-64 chunk-8 ceiling: "
          + ", ".join(f"{w} {x:.2f}x" for w, x in x64.items()) + " (gRPC target: >= 0.70x)")
    if rounds:
        print(f"interleaved rounds (each wire / the ceiling measured just before it; median of {args.rounds}): "
              + ", ".join(f"{w} {x:.2f}x" for w, x in summary["x_ceiling_64x8_rounds_median"].items()))
        for w in ("session API", *wires.WIRES):
            rs = [r for r in rounds if r["wire"] == w]
            print(f"  {w:<16} " + "  ".join(f"{r['x_ceiling']:.2f}x (batch {r['mean_batch']:.0f}, engine busy "
                                                f"{100 * r['compute_share']:.0f} %)" for r in rs))
    print(f"--persist costs {100 * summary['persist_throughput_cost']:.1f} % of the 64-session throughput "
          f"({persist.get('persist_ms_per_batch', float('nan')):.2f} ms of fsync per batch)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                           "python": platform.python_version()},
                               "model": ZOO if args.model is None else str(model), "serve_args": args.serve_args,
                               "summary": summary, "rows": rows,
                               "rounds": rounds},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
