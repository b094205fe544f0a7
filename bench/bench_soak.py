"""Soak `wmdeploy serve`: mixed session traffic with clients that vanish mid-pipeline, checked for what users rely on.

    python bench/bench_soak.py [--model M.onnx] [--seconds 60] [--workers 8] [--json bench/results/soak.json]

One ``wmdeploy serve --persist`` subprocess on 127.0.0.1 (with --session-ttl and --persist-ttl, so sessions
are evicted, restored and expired while it runs); ``--workers`` client threads, each owning a few sessions,
draw actions at random: create, HTTP step, snapshot (checked), restore (a new session from another's
snapshot), reset, delete, and WebSocket pipelines of 5-30 chunks that read some answers and then close
cleanly or drop the TCP connection (no close frame) mid-pipeline. It checks, and exits 1 unless all hold:

* **no 5xx** for any client action, and **no hung request** (every request answered within 30 s);
* **resident memory flat**: the server's RSS at the end is within 5 % of its RSS after warm-up (the first
  quarter of the run), medians of the samples taken every 0.5 s;
* **memories are prefixes**: after every WebSocket (settled), at every snapshot action and for every
  session left at the end, the session's state equals a local stream fed its base (initial state or
  restored snapshot) and then the first ``steps`` chunks its client sent (within batching's rounding,
  1e-5). The client then re-bases on that snapshot, so a check never depends on guessing what ran.

Baseline measured in the same run: the p50 of 200 lone HTTP steps on the idle server before the soak;
the table shows each action's p50/p99 and the soak's step p50 as a ratio to it. The machine is shared:
compare ratios, not milliseconds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

TIMEOUT_S = 30.0


def export_model(path: Path) -> None:
    import torch  # noqa: PLC0415

    from wmdeploy import export  # noqa: PLC0415
    from wmdeploy.models.lstm_lm import LSTMLanguageModel  # noqa: PLC0415

    torch.manual_seed(0)
    export(LSTMLanguageModel(embed_dim=16, hidden_size=64, num_layers=2), path, verify=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Truth:
    """What a session must hold: ``base`` (None: the initial state) then the chunks sent since."""

    base: bytes | None
    base_steps: int
    chunks: list[np.ndarray] = field(default_factory=list)


@dataclass
class Stats:
    latency: dict[str, list[float]] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)
    fivexx: list[str] = field(default_factory=list)
    hung: list[str] = field(default_factory=list)
    checks: int = 0
    mismatches: list[str] = field(default_factory=list)
    disconnects: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, action: str, seconds: float, code: int) -> None:
        with self.lock:
            self.latency.setdefault(action, []).append(seconds)
            self.codes[f"{action} {code}"] = self.codes.get(f"{action} {code}", 0) + 1
            if code >= 500:
                self.fivexx.append(f"{action} {code}")


class Worker(threading.Thread):
    def __init__(self, n: int, url: str, model: Any, stats: Stats, until: float, seed: int) -> None:
        super().__init__(daemon=True)
        self.n, self.url, self.model, self.stats, self.until = n, url, model, stats, until
        self.rng, self.np_rng = random.Random(seed), np.random.default_rng(seed)
        self.sessions: dict[str, Truth] = {}
        self.made = 0
        self.client = httpx.Client(base_url=url, timeout=TIMEOUT_S)

    # ---- requests --------------------------------------------------------------------------------------
    def call(self, action: str, method: str, path: str, **kw: Any) -> httpx.Response | None:
        t0 = time.perf_counter()
        try:
            r = self.client.request(method, path, **kw)
        except httpx.TimeoutException:
            self.stats.hung.append(f"{action} {path}")
            return None
        self.stats.record(action, time.perf_counter() - t0, r.status_code)
        return r

    def chunk(self) -> np.ndarray:
        return self.np_rng.integers(0, 200, size=(1, int(self.np_rng.integers(1, 5))), dtype=np.int64)

    # ---- the local truth -------------------------------------------------------------------------------
    def check(self, sid: str, blob: bytes) -> None:
        """The snapshot holds base + the first ``steps - base_steps`` chunks sent; then re-base on it."""
        from wmdeploy import snapshot as snap  # noqa: PLC0415

        truth = self.sessions[sid]
        steps = int(snap.meta(blob)["steps"])
        ran = steps - truth.base_steps
        self.stats.checks += 1
        if not 0 <= ran <= len(truth.chunks):
            self.stats.mismatches.append(f"{sid}: {steps} steps, base {truth.base_steps} + {len(truth.chunks)} sent")
        else:
            local = self.model.stream(truth.base) if truth.base is not None else self.model.stream()
            for ch in truth.chunks[:ran]:
                local.step(tokens=ch)
            held = snap.loads(self.model.spec, blob)
            for name, want in local.state.items():
                if not np.allclose(held[name], want, rtol=1e-5, atol=1e-5):
                    self.stats.mismatches.append(f"{sid}: state '{name}' after {steps} steps is no prefix")
                    break
        self.sessions[sid] = Truth(blob, steps)

    def settle(self, sid: str) -> bytes | None:
        """The snapshot once the step count stops moving (what a closed WebSocket let run has run)."""
        last = -1
        for _ in range(200):
            r = self.call("info", "GET", f"/v1/sessions/{sid}")
            if r is None or r.status_code != 200:
                return None
            if r.json()["steps"] == last:
                break
            last = r.json()["steps"]
            time.sleep(0.05)
        r = self.call("snapshot", "GET", f"/v1/sessions/{sid}/snapshot")
        return r.content if r is not None and r.status_code == 200 else None

    # ---- actions ---------------------------------------------------------------------------------------
    def create(self) -> None:
        sid = f"w{self.n}-{self.made}"
        self.made += 1
        r = self.call("create", "POST", "/v1/sessions", json={"id": sid})
        if r is not None and r.status_code == 201:
            self.sessions[sid] = Truth(None, 0)

    def step(self, sid: str) -> None:
        ch = self.chunk()
        r = self.call("step", "POST", f"/v1/sessions/{sid}/step", json={"inputs": {"tokens": ch.tolist()}})
        if r is None or r.status_code == 200 or r.status_code >= 500:  # applied (or unknown: may have run)
            self.sessions[sid].chunks.append(ch)

    def snapshot(self, sid: str) -> None:
        r = self.call("snapshot", "GET", f"/v1/sessions/{sid}/snapshot")
        if r is not None and r.status_code == 200:
            self.check(sid, r.content)

    def restore(self, sid: str) -> None:
        r = self.call("snapshot", "GET", f"/v1/sessions/{sid}/snapshot")
        if r is None or r.status_code != 200:
            return
        self.check(sid, r.content)
        new = f"w{self.n}-{self.made}"
        self.made += 1
        r = self.call("restore", "POST", f"/v1/sessions?id={new}", content=r.content,
                      headers={"content-type": "application/octet-stream"})
        if r is not None and r.status_code == 201:
            self.sessions[new] = Truth(self.sessions[sid].base, self.sessions[sid].base_steps)

    def reset(self, sid: str) -> None:
        r = self.call("reset", "POST", f"/v1/sessions/{sid}/reset")
        if r is not None and r.status_code == 200:
            self.sessions[sid] = Truth(None, 0)

    def delete(self, sid: str) -> None:
        r = self.call("delete", "DELETE", f"/v1/sessions/{sid}")
        if r is not None and r.status_code == 204:
            del self.sessions[sid]

    def websocket(self, sid: str) -> None:
        import websockets.sync.client as wsc  # noqa: PLC0415
        from websockets.exceptions import ConnectionClosedError  # noqa: PLC0415

        n, abrupt = self.rng.randint(5, 30), self.rng.random() < 0.6
        read = self.rng.randint(0, n) if abrupt else n
        t0 = time.perf_counter()
        try:
            with wsc.connect(self.url.replace("http", "ws") + f"/v1/sessions/{sid}/stream",
                             open_timeout=TIMEOUT_S, close_timeout=5) as ws:
                for _ in range(n):
                    ch = self.chunk()
                    self.sessions[sid].chunks.append(ch)
                    ws.send(json.dumps({"inputs": {"tokens": ch.tolist()}}))
                for _ in range(read):
                    answer = json.loads(ws.recv(timeout=TIMEOUT_S))
                    if "error" in answer and any(w in answer["error"] for w in ("internal", "engine")):
                        self.stats.fivexx.append(f"websocket chunk: {answer['error'][:80]}")
                if abrupt:
                    self.stats.disconnects += 1
                    ws.close_socket()
        except TimeoutError:
            self.stats.hung.append(f"websocket {sid}")
        except ConnectionClosedError as exc:  # closed by the server after a failed chunk: 1011 is a 5xx
            if exc.rcvd is None or exc.rcvd.code == 1011:
                self.stats.fivexx.append(f"websocket {sid}: {exc}"[:120])
            else:  # 1013 (429/503: try again later), 4404 (deleted meanwhile): the client's lot, answered
                with self.stats.lock:
                    key = f"websocket closed {exc.rcvd.code}"
                    self.stats.codes[key] = self.stats.codes.get(key, 0) + 1
        except Exception as exc:  # noqa: BLE001  (a refused handshake and the like: reported, not fatal)
            self.stats.fivexx.append(f"websocket {sid}: {type(exc).__name__}: {exc}"[:120])
        self.stats.record("websocket", time.perf_counter() - t0, 101)
        blob = self.settle(sid)
        if blob is not None:
            self.check(sid, blob)

    def run(self) -> None:
        actions = [(self.step, 40), (self.websocket, 8), (self.snapshot, 8), (self.restore, 3), (self.reset, 3),
                   (self.delete, 3)]
        fns, weights = zip(*actions)
        try:
            while time.monotonic() < self.until:
                if len(self.sessions) < 3 or (len(self.sessions) < 6 and self.rng.random() < 0.05):
                    self.create()
                    continue
                fn = self.rng.choices(fns, weights)[0]
                fn(self.rng.choice(sorted(self.sessions)))
                if self.rng.random() < 0.05:
                    time.sleep(self.rng.uniform(0.2, 1.5))  # idle now and then: TTL evictions, restores
            for sid in sorted(self.sessions):  # every survivor, checked once more at the end
                blob = self.settle(sid)
                if blob is not None:
                    self.check(sid, blob)
        finally:
            self.client.close()


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) * 1e3 if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--json", type=Path, default=Path("bench/results/soak.json"))
    args = ap.parse_args()
    import wmdeploy  # noqa: PLC0415

    work = Path(tempfile.mkdtemp(prefix="wm_soak_"))
    model_path = args.model or work / "lm.onnx"
    if args.model is None:
        export_model(model_path)
    model = wmdeploy.load(model_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "wmdeploy", "serve", str(model_path), "--port", str(port), "--log-level", "warning",
           "--persist", str(work / "state"), "--max-sessions", "48", "--session-ttl", "1", "--persist-ttl", "600",
           "--batch-window-ms", "2", "--request-timeout", "20"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "wb"))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start; see {work / 'serve.log'}")
            time.sleep(0.1)
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as c:  # the baseline: lone steps on an idle server
            c.post("/v1/sessions", json={"id": "baseline"})
            lone = []
            for _ in range(200):
                t0 = time.perf_counter()
                c.post("/v1/sessions/baseline/step", json={"inputs": {"tokens": [[5, 6]]}})
                lone.append(time.perf_counter() - t0)
            c.delete("/v1/sessions/baseline")
        stats = Stats()
        t_start = time.monotonic()
        until = t_start + args.seconds
        workers = [Worker(i, url, model, stats, until, seed=i) for i in range(args.workers)]
        for w in workers:
            w.start()
        samples: list[tuple[float, int]] = []
        while any(w.is_alive() for w in workers):
            samples.append((time.monotonic() - t_start, rss_bytes(server.pid)))
            time.sleep(0.5)
        for w in workers:
            w.join()
        metrics = httpx.get(url + "/metrics", timeout=TIMEOUT_S).text
    finally:
        server.terminate()
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            code = -9
    warm = [r for t, r in samples if args.seconds * 0.25 <= t <= args.seconds * 0.35]
    end = [r for t, r in samples if t >= args.seconds * 0.9]
    rss_warm, rss_end = float(np.median(warm or [samples[0][1]])), float(np.median(end or [samples[-1][1]]))
    growth = rss_end / rss_warm - 1
    lone_p50 = pct(lone, 50)
    rows = []
    for action, xs in sorted(stats.latency.items()):
        rows.append({"action": action, "count": len(xs), "p50_ms": pct(xs, 50), "p99_ms": pct(xs, 99),
                     "max_ms": max(xs) * 1e3})
    checks = {"no_5xx": not stats.fivexx, "no_hung_request": not stats.hung, "rss_growth_below_5pct": growth < 0.05,
              "memories_are_prefixes": not stats.mismatches and stats.checks > 0, "sigterm_exit_0": code == 0}
    print(f"\nsoak: {args.seconds:g} s, {args.workers} workers, {sum(r['count'] for r in rows)} requests, "
          f"{stats.disconnects} abrupt WebSocket drops, {stats.checks} prefix checks")
    print(f"{'action':<10} {'count':>7} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for r in rows:
        print(f"{r['action']:<10} {r['count']:>7} {r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f} {r['max_ms']:>9.1f}")
    step_p50 = next((r["p50_ms"] for r in rows if r["action"] == "step"), float("nan"))
    print(f"baseline: lone step p50 {lone_p50:.2f} ms; soak step p50 = {step_p50 / lone_p50:.2f}x the baseline")
    print(f"server RSS after warm-up {rss_warm / 2**20:.1f} MiB, at the end {rss_end / 2**20:.1f} MiB "
          f"({growth * 100:+.1f} %)")
    status = {k: v for k, v in stats.codes.items()}
    print("answers:", ", ".join(f"{k}: {v}" for k, v in sorted(status.items())))
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    for what in (stats.fivexx[:5], stats.hung[:5], stats.mismatches[:5]):
        for line in what:
            print("   ", line)
    result = {"format": "wmdeploy.bench_soak", "version": 1, "machine": {"hostname": platform.node(),
              "cpus": os.cpu_count(), "python": platform.python_version()},
              "settings": {"seconds": args.seconds, "workers": args.workers, "server": cmd[3:]},
              "baseline_step_p50_ms": lone_p50, "soak_step_p50_ratio": step_p50 / lone_p50, "actions": rows,
              "answers": status, "abrupt_disconnects": stats.disconnects, "prefix_checks": stats.checks,
              "rss_after_warmup_bytes": rss_warm, "rss_end_bytes": rss_end, "rss_growth": growth,
              "rss_samples": samples, "fivexx": stats.fivexx, "hung": stats.hung, "mismatches": stats.mismatches,
              "server_exit_code": code, "checks": checks,
              "expired_metric": next((ln for ln in metrics.splitlines()
                                      if ln.startswith("wmdeploy_expired_sessions_total")), None)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
