"""Benchmark the growable StreamPool (issue 15) against a pool allocated at its size from the start.

    python bench/bench_pool_growth.py [--json bench/results/pool_growth.json] [--rounds 60] [--per-round 4]

Model: the zoo's sliding-window Transformer LM (untrained; a 64-position KV cache, 65,544 bytes of state
per stream: the memory-heavy case), exported here once. Measured in one run (ratios are what to compare:
the machine is shared and noisy):

* **steady state**: N live streams (N = 10, 100, 200) in a pool that *grew* to them by joins, against a
  pool *pre-sized* (``reserve=``) to the same number of slots; a decode step (chunk 1) of every stream
  (the packed prefix) and of every other stream (the gather path). Interleaved timing; the ratio
  grown / pre-sized should be 1.00 (same memory layout, same code path). Reported three ways: wall-clock
  medians, the best (least disturbed) round, and the engine thread's CPU time (``threads=1``: ONNX Runtime
  computes on the calling thread), which other tenants of a loaded box disturb least;
* **right after a growth**: the join that doubles the arena (it copies the live states) against a join
  that does not, and the first step after it (the backend rebuilds its bindings) against a steady step;
* **server memory**: resident memory of ``wmdeploy serve`` with 10 live sessions at ``--max-sessions``
  20000 and 16, and the old behaviour (the pool pre-sized to ``--max-sessions``, as before this change)
  at 20000. Each is a fresh subprocess.
* **KV row** (issue 29, ``--kv``): a random-init Qwen3-shaped LM (4 layers, 4 KV heads of 32: 4 KiB of KV per
  token) exported by ``export hf:`` at ``--max-context 4096`` and at 256; 64 sessions holding 50 tokens each.
  Arena bytes of the pools (the 4096 file's pool keeps them in its 256-token tier), a decode step of all 64
  (interleaved A/B, as above), and the resident memory of ``wmdeploy serve`` with the 64 sessions (a fresh
  subprocess per file). The issue asks <= 1.5x the bytes and <= 1.1x the step of the 256 file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_timing.py
from _timing import interleaved  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' server helpers (ProcessServer, RSS)


def export_zoo(path: Path) -> None:
    import torch  # noqa: PLC0415

    from wmdeploy.exporter import export  # noqa: PLC0415
    from wmdeploy.models.zoo import build  # noqa: PLC0415

    torch.manual_seed(0)
    export(build("sliding_window"), path, verify=False)


def tokens(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"tokens": rng.integers(0, 256, size=(1, 1), dtype=np.int64)}


def steady_state(model: Any, n: int, rounds: int, per_round: int) -> dict[str, Any]:
    from wmdeploy.streaming import _pow2_at_least  # noqa: PLC0415

    rng = np.random.default_rng(0)
    grown = model.pool()
    for _ in range(n):
        grown.join()
    slots = grown.allocated
    assert slots == _pow2_at_least(n)
    presized = model.pool(slots, reserve=slots)
    for _ in range(n):
        presized.join()
    all_g = {s: tokens(rng) for s in grown.sids}
    all_p = {s: tokens(rng) for s in presized.sids}
    half_g = {s: tokens(rng) for s in grown.sids[::2]}
    half_p = {s: tokens(rng) for s in presized.sids[::2]}
    # Each comparison is its own A/B pair. Four methods in one alternating order (ABCD DCBA ...) ran D and A
    # twice back to back at every round boundary, so those two found their arena hot in cache half the time:
    # that favoured grown_all and presized_half (ratios ~0.99 and ~1.08) with no difference in the pools.
    # With two methods both run twice in a row equally often.
    t = {**rounds_of_medians({"grown_all": lambda: grown.step(all_g), "presized_all": lambda: presized.step(all_p)},
                             rounds, per_round),
         **rounds_of_medians({"grown_half": lambda: grown.step(half_g), "presized_half": lambda: presized.step(half_p)},
                             rounds, per_round)}
    return {"streams": n, "slots": slots, "arena_bytes": grown.nbytes,
            **{f"{k}_us": round(v["p50"] * 1e6, 1) for k, v in t.items()},
            "ratio_all": round(t["grown_all"]["p50"] / t["presized_all"]["p50"], 3),
            "ratio_half": round(t["grown_half"]["p50"] / t["presized_half"]["p50"], 3),
            "best_ratio_all": round(t["grown_all"]["best"] / t["presized_all"]["best"], 3),
            "best_ratio_half": round(t["grown_half"]["best"] / t["presized_half"]["best"], 3),
            "cpu_ratio_all": round(t["grown_all"]["cpu"] / t["presized_all"]["cpu"], 3),
            "cpu_ratio_half": round(t["grown_half"]["cpu"] / t["presized_half"]["cpu"], 3)}


def rounds_of_medians(methods: dict[str, Any], rounds: int, per_round: int) -> dict[str, dict[str, float]]:
    """Per method: the median over rounds of each round's median call, and the best round's median.
    Methods alternate order round by round (on a loaded 2-core box, whoever runs first is luckier);
    the best round is the one the other tenants of the machine disturbed least."""
    interleaved(methods, 1, 1)  # warm-up (bindings, first-touch pages)
    per: dict[str, list[float]] = {k: [] for k in methods}
    cpu: dict[str, list[float]] = {k: [] for k in methods}
    clock, cpu_clock = time.perf_counter, time.thread_time  # threads=1: the engine runs on this thread
    for r in range(rounds):
        items = list(methods.items())
        for name, fn in (items if r % 2 == 0 else items[::-1]):
            times, cpus = [], []
            for _ in range(per_round):
                t0, c0 = clock(), cpu_clock()
                fn()
                times.append(clock() - t0)
                cpus.append(cpu_clock() - c0)
            per[name].append(statistics.median(times))
            cpu[name].append(statistics.median(cpus))
    return {k: {"p50": statistics.median(v), "best": min(v), "cpu": statistics.median(cpu[k])} for k, v in per.items()}


def after_growth(model: Any, n: int, repeats: int) -> dict[str, Any]:
    """The join that grows the arena from ``n`` to ``2n`` slots, and the first full step after it."""
    rng = np.random.default_rng(1)
    grow_join, plain_join, first_step, steady_step = [], [], [], []
    clock = time.perf_counter
    for _ in range(repeats):
        pool = model.pool()
        for _ in range(n):
            pool.join()
        reqs = {s: tokens(rng) for s in pool.sids}
        for _ in range(3):
            pool.step(reqs)
        t0 = clock()
        sid = pool.join()  # n -> 2n slots: copies n states
        grow_join.append(clock() - t0)
        assert pool.allocated == 2 * n
        t0 = clock()
        pool.join()
        plain_join.append(clock() - t0)
        pool.leave(pool.sids[-1])
        reqs = {**reqs, sid: tokens(rng)}
        t0 = clock()
        pool.step(reqs)  # bindings into the new buffers are made on this call
        first_step.append(clock() - t0)
        for _ in range(5):
            t0 = clock()
            pool.step(reqs)
            steady_step.append(clock() - t0)
    med = lambda v: round(statistics.median(v) * 1e6, 1)  # noqa: E731
    return {"from_slots": n, "to_slots": 2 * n, "growing_join_us": med(grow_join), "plain_join_us": med(plain_join),
            "first_step_after_us": med(first_step), "steady_step_us": med(steady_step),
            "first_step_ratio": round(statistics.median(first_step) / statistics.median(steady_step), 2)}


_PRESIZED = """
import sys
import wmdeploy.serve.sessions as s
init = s.SessionTable.__init__
def presized(self, *a, **k):  # the behaviour before issue 15: every slot allocated up front
    init(self, *a, **k)
    self.pool = self.model.pool(self.capacity, reserve=self.capacity)
    for both in self.pool._arena.both:  # the old host arena also filled the second (pong) buffer
        both[1] = both[0]
s.SessionTable.__init__ = presized
sys.argv = ["wmdeploy", *sys.argv[1:]]
from wmdeploy.cli import main
main()
"""


def server_memory(model: Path, work: Path) -> list[dict[str, Any]]:
    import httpx  # noqa: PLC0415

    from _serve_server import ProcessServer  # noqa: PLC0415
    from test_pool_growth import rss_bytes  # noqa: PLC0415

    shim = work / "presized_serve.py"
    shim.write_text(_PRESIZED)
    rows = []
    for label, max_sessions, presized in (("grows", 20000, False), ("grows", 16, False), ("pre-sized (before)", 20000, True)):
        server = (_shim_server(ProcessServer, shim, model, max_sessions) if presized
                  else ProcessServer(model, "--max-sessions", str(max_sessions)))
        try:
            with httpx.Client(base_url=server.url, timeout=60) as c:
                for i in range(10):
                    c.post("/v1/sessions", json={"id": f"s{i}"}).raise_for_status()
                    c.post(f"/v1/sessions/s{i}/step", json={"inputs": {"tokens": [[72, 105]]}}).raise_for_status()
                gauges = {k: float(v) for k, v in (ln.split() for ln in c.get("/metrics").text.splitlines()
                                                   if ln.startswith("wmdeploy_arena_"))}
            rows.append({"server": label, "max_sessions": max_sessions, "live": 10,
                         "rss_mib": round(rss_bytes(server.proc.pid) / 2**20, 1),
                         "arena_slots": gauges.get("wmdeploy_arena_slots"),
                         "arena_mib": round(gauges.get("wmdeploy_arena_bytes", 0) / 2**20, 2)})
        finally:
            server.kill()
    return rows


def _shim_server(cls: Any, shim: Path, model: Path, max_sessions: int) -> Any:
    """A ProcessServer whose command is the shim (same arguments as ``python -m wmdeploy serve``)."""
    import subprocess  # noqa: PLC0415

    orig = subprocess.Popen

    def popen(cmd: list[str], **kw: Any) -> Any:
        return orig([sys.executable, str(shim), *cmd[3:]], **kw)  # cmd = [python, -m, wmdeploy, serve, ...]

    subprocess.Popen = popen  # type: ignore[misc]
    try:
        return cls(model, "--max-sessions", str(max_sessions))
    finally:
        subprocess.Popen = orig  # type: ignore[misc]


def export_kv(work: Path) -> dict[int, Path]:
    """The KV row's model at two bounds (export hf: of a folder saved here; no download, not verified)."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, Qwen3Config  # noqa: PLC0415

    import wmdeploy  # noqa: PLC0415

    config = Qwen3Config(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=4096)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(work / "qwen3"))
    out = {}
    for bound in (4096, 256):
        out[bound] = work / f"qwen3_{bound}.onnx"
        wmdeploy.export(f"hf:{work / 'qwen3'}", out[bound], max_context=bound, verify=False)
    return out


def kv_row(paths: dict[int, Path], sessions: int, context: int, rounds: int, per_round: int,
           server: bool) -> dict[str, Any]:
    import wmdeploy  # noqa: PLC0415

    rng = np.random.default_rng(0)
    pools, reqs = {}, {}
    for bound, path in paths.items():
        model = wmdeploy.load(path, threads=1)
        pool = model.pool()
        for _ in range(sessions):
            pool.join()
        for sid in pool.sids:  # the same 50 tokens for both files' sessions
            pool.step({sid: {"tokens": np.arange(context, dtype=np.int64)[None] % 2048}})
        pools[bound], reqs[bound] = pool, {s: {"tokens": rng.integers(0, 2048, (1, 1))} for s in pool.sids}
    # each decode step moves every position on by one: at most 24 rounds of 4 keep them at 50..147 tokens, inside
    # the 256 file's bound and the 4096 file's first tier (both files step the same contexts)
    rounds, per_round = min(rounds, 24), min(per_round, 4)
    t = rounds_of_medians({f"step_{b}": (lambda b=b: pools[b].step(reqs[b])) for b in paths}, rounds, per_round)
    assert max(pools[4096].position(s) for s in pools[4096].sids) <= 256 and pools[4096].moves == 0
    row: dict[str, Any] = {"sessions": sessions, "context": context,
                           "pool_4096": type(pools[4096]).__name__, "pool_256": type(pools[256]).__name__,
                           "arena_mib_4096": round(pools[4096].nbytes / 2**20, 2),
                           "arena_mib_256": round(pools[256].nbytes / 2**20, 2),
                           "bytes_ratio": round(pools[4096].nbytes / pools[256].nbytes, 3),
                           "single_tier_mib_4096": round(sessions * sum(
                               s.bytes_per_stream * (1 if s.inplace else 2) for s in pools[4096].spec.states) / 2**20, 1),
                           "step_us_4096": round(t["step_4096"]["p50"] * 1e6, 1),
                           "step_us_256": round(t["step_256"]["p50"] * 1e6, 1),
                           "step_ratio": round(t["step_4096"]["p50"] / t["step_256"]["p50"], 3),
                           "best_step_ratio": round(t["step_4096"]["best"] / t["step_256"]["best"], 3),
                           "cpu_step_ratio": round(t["step_4096"]["cpu"] / t["step_256"]["cpu"], 3)}
    del pools
    if server:
        row.update(kv_server_rss(paths, sessions, context))
    return row


def kv_server_rss(paths: dict[int, Path], sessions: int, context: int) -> dict[str, Any]:
    """Resident memory of ``wmdeploy serve`` holding the sessions, one fresh subprocess per file."""
    import httpx  # noqa: PLC0415

    from _serve_server import ProcessServer  # noqa: PLC0415
    from test_pool_growth import rss_bytes  # noqa: PLC0415

    rss = {}
    for bound, path in paths.items():
        server = ProcessServer(path, "--max-sessions", str(sessions))
        try:
            with httpx.Client(base_url=server.url, timeout=120) as c:
                for i in range(sessions):
                    c.post("/v1/sessions", json={"id": f"s{i}"}).raise_for_status()
                    c.post(f"/v1/sessions/s{i}/step", json={"inputs": {"tokens": [list(range(context))]}}).raise_for_status()
            time.sleep(1.0)
            rss[bound] = rss_bytes(server.proc.pid)
        finally:
            server.kill()
    return {"rss_mib_4096": round(rss[4096] / 2**20, 1), "rss_mib_256": round(rss[256] / 2**20, 1),
            "rss_ratio": round(rss[4096] / rss[256], 3)}


def table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(str(r[k]).rjust(w) for k, w in zip(keys, widths)) for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--per-round", type=int, default=4)
    ap.add_argument("--no-server", action="store_true", help="skip the server memory part")
    ap.add_argument("--kv", action="store_true", help="only the KV row (issue 29: tiers of KV capacity)")
    args = ap.parse_args()
    import wmdeploy  # noqa: PLC0415

    if args.kv:
        with tempfile.TemporaryDirectory() as tmp:
            row = kv_row(export_kv(Path(tmp)), 64, 50, args.rounds, args.per_round, not args.no_server)
        print("KV row: 64 sessions of 50 tokens, --max-context 4096 file vs 256 file\n" + table([row]))
        print(f"\nbytes {row['bytes_ratio']:.3f}x (issue 29 asks <= 1.5x), decode step {row['step_ratio']:.3f}x of "
              f"wall-clock medians, {row['best_step_ratio']:.3f}x of the best rounds, {row['cpu_step_ratio']:.3f}x of "
              "thread CPU time (asks <= 1.1x)" + (f"; server RSS {row['rss_ratio']:.3f}x" if "rss_ratio" in row else ""))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"kv": row, "machine": {"cpus": os.cpu_count()}}, indent=2))
        return

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sliding_window.onnx"
        export_zoo(path)
        model = wmdeploy.load(path, threads=1)
        print(f"model: zoo sliding_window, {model.spec.state_bytes_per_stream} bytes of state per stream; "
              f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
        steady = [steady_state(model, n, args.rounds, args.per_round) for n in (10, 100, 200)]
        print("\nsteady state: grown pool vs pre-sized pool (decode step, median us)\n" + table(steady))
        growth = [after_growth(model, n, repeats=7) for n in (16, 128)]
        print("\nright after a growth (median us)\n" + table(growth))
        memory = [] if args.no_server else server_memory(path, Path(tmp))
        if memory:
            print("\nwmdeploy serve, 10 live sessions\n" + table(memory))
    worst = max(max(r["ratio_all"], r["ratio_half"]) for r in steady)
    best = max(max(r["best_ratio_all"], r["best_ratio_half"]) for r in steady)
    cpu = max(max(r["cpu_ratio_all"], r["cpu_ratio_half"]) for r in steady)
    print(f"\nsteady state: worst grown / pre-sized ratio {worst:.3f} of wall-clock medians, {best:.3f} of the "
          f"best rounds, {cpu:.3f} of thread CPU time (issue 15 asks <= 1.05)")
    if memory:
        big, small = memory[0]["rss_mib"], memory[1]["rss_mib"]
        print(f"server: --max-sessions 20000 takes {big / small:.2f}x the resident memory of --max-sessions 16 "
              f"(issue 15 asks <= 1.3x + 30 MiB: {big <= 1.3 * small + 30}); pre-sized it took "
              f"{memory[2]['rss_mib'] / small:.1f}x")
    result = {"steady": steady, "after_growth": growth, "server_memory": memory,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
