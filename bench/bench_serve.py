"""Benchmark `wmdeploy serve`: N concurrent clients streaming, batching on vs off, and the cost of --persist.

    python bench/bench_serve.py [--model M.onnx] [--clients 1,16] [--steps 40] [--json bench/results/serve.json]

Each configuration runs a fresh ``wmdeploy serve`` subprocess (so the clients' Python does not share the
server's GIL); every client thread creates a session and streams ``--steps`` one-token chunks through the
JSON session API, one request at a time. Reported per configuration: aggregate steps/s, per-step request
latency percentiles (client side), mean batch size (from /metrics), and for --persist the state-log time
per batch and per step (from /metrics). Baseline, in the same run: ``--max-batch 1 --batch-window-ms 0``
(no batching). Model: an LSTM LM (embedding -> 2-layer LSTM(--hidden) -> vocab 256) exported here with
torch unless --model is given. Machines are shared and noisy: compare ratios within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np


def build_model(path: Path, hidden: int, vocab: int = 256, embed: int = 128, layers: int = 2) -> None:
    import onnx  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from wmdeploy.contract import StateSpec, StreamingSpec, TensorSpec, write_spec  # noqa: PLC0415

    torch.manual_seed(0)

    class LM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, embed)
            self.lstm = torch.nn.LSTM(embed, hidden, layers, batch_first=True)
            self.head = torch.nn.Linear(hidden, vocab)

        def forward(self, tokens, h, c):  # type: ignore[no-untyped-def]
            y, (h2, c2) = self.lstm(self.emb(tokens), (h, c))
            return self.head(y), h2, c2

    ax = {1: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LM().eval(), (torch.zeros(1, 1, dtype=torch.long), torch.zeros(layers, 1, hidden),
                                        torch.zeros(layers, 1, hidden)), str(path), dynamo=False, opset_version=17,
                          input_names=["tokens", "h", "c"], output_names=["logits", "h_out", "c_out"],
                          dynamic_axes={"tokens": {0: "batch", 1: "time"}, "logits": {0: "batch", 1: "time"},
                                        "h": ax, "c": ax, "h_out": ax, "c_out": ax})
    spec = StreamingSpec(inputs=[TensorSpec("tokens", ["batch", "time"], "int64")],
                         outputs=[TensorSpec("logits", ["batch", "time", vocab])],
                         states=[StateSpec("h", [layers, "batch", hidden], output="h_out"),
                                 StateSpec("c", [layers, "batch", hidden], output="c_out")], chunk_invariant=True)
    onnx.save(write_spec(onnx.load(str(path)), spec), str(path))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def run_config(model: Path, label: str, clients: int, steps: int, extra: list[str]) -> dict[str, Any]:
    import httpx  # noqa: PLC0415

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "wmdeploy", "serve", str(model), "--port", str(port),
                             "--log-level", "warning", "--max-sessions", str(max(clients, 1) + 8), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{label}: server did not start")
            time.sleep(0.05)
        lat: list[float] = []
        lock = threading.Lock()
        barrier = threading.Barrier(clients + 1)
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 256, size=(clients, steps + 3)).tolist()

        def client(i: int) -> None:
            mine = []
            with httpx.Client(base_url=url, timeout=60) as c:
                sid = c.post("/v1/sessions", json={}).json()["id"]
                for k in range(3):  # warm-up
                    c.post(f"/v1/sessions/{sid}/step", json={"inputs": {"tokens": [[tokens[i][k]]]}})
                barrier.wait()
                for k in range(3, steps + 3):
                    t0 = time.perf_counter()
                    r = c.post(f"/v1/sessions/{sid}/step", json={"inputs": {"tokens": [[tokens[i][k]]]}})
                    mine.append(time.perf_counter() - t0)
                    assert r.status_code == 200, r.text
            with lock:
                lat.extend(mine)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        before = httpx.get(url + "/metrics").text
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        after = httpx.get(url + "/metrics").text
        d = {k: metric(after, k) - metric(before, k) for k in
             ("wmdeploy_batch_size_count", "wmdeploy_batch_size_sum", "wmdeploy_persist_seconds_sum",
              "wmdeploy_persist_seconds_count", "wmdeploy_engine_step_seconds_sum")}
        ms = np.asarray(lat) * 1e3
        n = clients * steps
        row = {"config": label, "clients": clients, "steps": n, "steps_per_s": n / wall,
               "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
               "p99_ms": float(np.percentile(ms, 99)),
               "mean_batch": d["wmdeploy_batch_size_sum"] / max(d["wmdeploy_batch_size_count"], 1),
               "engine_ms_per_batch": 1e3 * d["wmdeploy_engine_step_seconds_sum"] / max(d["wmdeploy_batch_size_count"], 1)}
        if d["wmdeploy_persist_seconds_count"] > 0:
            row["persist_ms_per_batch"] = 1e3 * d["wmdeploy_persist_seconds_sum"] / d["wmdeploy_persist_seconds_count"]
            row["persist_ms_per_step"] = 1e3 * d["wmdeploy_persist_seconds_sum"] / d["wmdeploy_batch_size_sum"]
        return row
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--steps", type=int, default=40, help="steps per client")
    ap.add_argument("--json", default="bench/results/serve.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    model = args.model
    if model is None:
        model = tmp / f"lstm_{args.hidden}.onnx"
        build_model(model, args.hidden)
    rows = []
    for clients in [int(c) for c in args.clients.split(",")]:
        configs = [("no batching (--max-batch 1)", ["--max-batch", "1", "--batch-window-ms", "0"]),
                   ("batching (64, 2 ms)", ["--max-batch", "64", "--batch-window-ms", "2"]),
                   ("batching + --persist", ["--max-batch", "64", "--batch-window-ms", "2", "--persist",
                                             str(tmp / f"state_{clients}")])]
        for label, extra in configs:
            rows.append(run_config(model, label, clients, args.steps, extra))
            print(f"  done: {label}, {clients} clients", file=sys.stderr)
    base = {r["clients"]: r["steps_per_s"] for r in rows if r["config"].startswith("no batching")}
    for r in rows:
        r["throughput_vs_no_batching"] = r["steps_per_s"] / base[r["clients"]]
    head = f"{'config':<28} {'clients':>7} {'steps/s':>9} {'x base':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} " \
           f"{'batch':>6} {'persist ms/step':>16}"
    print(head)
    print("-" * len(head))
    for r in rows:
        persist = f"{r['persist_ms_per_step']:.3f} ({r['persist_ms_per_batch']:.2f}/batch)" if "persist_ms_per_step" in r else "-"
        print(f"{r['config']:<28} {r['clients']:>7} {r['steps_per_s']:>9.1f} {r['throughput_vs_no_batching']:>7.2f} "
              f"{r['p50_ms']:>8.2f} {r['p90_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['mean_batch']:>6.1f} {persist:>16}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                               "model": str(model), "hidden": args.hidden, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
