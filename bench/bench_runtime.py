"""Benchmark the streaming runtime against hand-written baselines measured in the same run.

    python bench/bench_runtime.py [--json bench/results/runtime.json] [--rounds 8] [--per-round 25]

Model: the 2x1024 LSTM LM (embedding 256 -> 2-layer LSTM(1024) -> linear to vocab 256), from the zoo
(``wmdeploy.models.lstm_lm``) exported with ``wmdeploy.export.export``, or a minimal equivalent exported
here when those are missing. Every timing is per step, median over ``rounds x per_round`` individually
timed steps after a warm-up, with the methods interleaved round by round so machine noise (2 shared
cores) hits them alike. Ratios compare numbers from this run only.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_timing.py, also when imported from elsewhere
from _timing import interleaved  # noqa: E402

HIDDEN, LAYERS, EMBED, VOCAB = 1024, 2, 256, 256


def build_model(path: Path) -> tuple[Any, str]:
    """(torch module, how it was built); writes the ONNX file with its spec to ``path``."""
    import torch

    torch.manual_seed(0)
    try:
        from wmdeploy.exporter import export
        from wmdeploy.models.lstm_lm import LSTMLanguageModel

        module = LSTMLanguageModel.preset("2x1024").eval()
        export(module, path, verify=False)
        return module, "wmdeploy.models.lstm_lm preset 2x1024 via wmdeploy.export.export"
    except ImportError:
        pass
    import onnx

    from wmdeploy.contract import StateSpec, StreamingSpec, TensorSpec, write_spec

    class LM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, EMBED)
            self.lstm = torch.nn.LSTM(EMBED, HIDDEN, LAYERS, batch_first=True)
            self.head = torch.nn.Linear(HIDDEN, VOCAB)

        def forward(self, tokens, h, c):  # type: ignore[no-untyped-def]
            y, (h2, c2) = self.lstm(self.embed(tokens), (h, c))
            return self.head(y), h2, c2

    module = LM().eval()
    ax = {1: "batch"}
    torch.onnx.export(module, (torch.zeros(1, 1, dtype=torch.long), torch.zeros(LAYERS, 1, HIDDEN), torch.zeros(LAYERS, 1, HIDDEN)),
                      str(path), dynamo=False, opset_version=17, input_names=["tokens", "h", "c"],
                      output_names=["logits", "h_out", "c_out"],
                      dynamic_axes={"tokens": {0: "batch", 1: "time"}, "logits": {0: "batch", 1: "time"},
                                    "h": ax, "c": ax, "h_out": ax, "c_out": ax})
    spec = StreamingSpec([TensorSpec("tokens", ["batch", "time"], "int64")], [TensorSpec("logits", ["batch", "time", VOCAB])],
                         [StateSpec("h", [LAYERS, "batch", HIDDEN], output="h_out"),
                          StateSpec("c", [LAYERS, "batch", HIDDEN], output="c_out")], chunk_invariant=True)
    onnx.save(write_spec(onnx.load(str(path)), spec), str(path))
    return module, "minimal LSTM LM exported by the bench (zoo/export not available)"


def bandwidth_gbs(nbytes: int = 256 << 20, repeats: int = 7) -> float:
    """Host memory bandwidth from a large numpy copy (bytes read + written per second)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(best) / 1e9


def matmul_gflops(m: int, k: int, n: int, repeats: int = 20) -> float:
    a = np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((k, n), dtype=np.float32)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(ts) / 1e9


def lstm_flops(batch: int) -> float:
    flops = 0
    for layer in range(LAYERS):
        inp = EMBED if layer == 0 else HIDDEN
        flops += 2 * batch * 4 * HIDDEN * (inp + HIDDEN)
    return flops + 2 * batch * HIDDEN * VOCAB


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench/results/runtime.json")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's choice)")
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch

    import wmdeploy

    tmp = Path(tempfile.mkdtemp(prefix="wmdeploy-bench-"))
    path = tmp / "lstm_2x1024.onnx"
    module, built = build_model(path)
    model = wmdeploy.load(path, threads=args.threads)
    # The raw baselines run on the model's own session: two sessions would each keep a spinning intra-op
    # thread pool and slow each other down on 2 cores, which measures the contention, not the runtime.
    sess = model.backend.session
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    rng = np.random.default_rng(0)
    tok1 = rng.integers(0, VOCAB, (1, 1), dtype=np.int64)

    # ---- batch 1, chunk 1 -----------------------------------------------------------------------------
    raw_state = [np.zeros((LAYERS, 1, HIDDEN), np.float32) for _ in range(2)]

    def raw_loop() -> None:
        _, raw_state[0], raw_state[1] = sess.run(None, {"tokens": tok1, "h": raw_state[0], "c": raw_state[1]})

    stream = model.stream()
    t_tok = torch.from_numpy(tok1)
    t_state = [torch.zeros(LAYERS, 1, HIDDEN), torch.zeros(LAYERS, 1, HIDDEN)]

    def eager() -> None:
        with torch.inference_mode():
            _, t_state[0], t_state[1] = module(t_tok, t_state[0], t_state[1])

    one = interleaved({"raw ORT run loop": raw_loop, "Stream.step": lambda: stream.step(tokens=tok1)},
                      args.rounds, args.per_round)
    time.sleep(0.2)  # let ORT's spinning threads park before torch's own pool starts (and vice versa)
    one.update(interleaved({"PyTorch eager": eager}, max(2, args.rounds // 2), args.per_round))
    time.sleep(0.2)

    # ---- batch 64 -------------------------------------------------------------------------------------
    B = 64
    tok64 = rng.integers(0, VOCAB, (B, 1), dtype=np.int64)
    raw64 = [np.zeros((LAYERS, B, HIDDEN), np.float32) for _ in range(2)]

    def raw_b64() -> None:
        _, raw64[0], raw64[1] = sess.run(None, {"tokens": tok64, "h": raw64[0], "c": raw64[1]})

    pool = model.pool(B)
    sids = [pool.join() for _ in range(B)]
    req = {sid: {"tokens": tok64[i:i + 1]} for i, sid in enumerate(sids)}
    big_pool = model.pool(4 * B, reserve=4 * B)  # slots > live streams: the [2, batch, H] state needs a gather/scatter
    big_sids = [big_pool.join() for _ in range(B)]
    big_req = {sid: {"tokens": tok64[i:i + 1]} for i, sid in enumerate(big_sids)}
    singles = [model.stream() for _ in range(B)]

    def one_by_one() -> None:
        for i, s in enumerate(singles):
            s.step(tokens=tok64[i:i + 1])

    # Mixed chunk lengths: half the streams send 1 token, half 2 -> two engine calls (grouping), against
    # one call where everyone sends 2 (what padding would cost, were it even correct).
    tok64x2 = rng.integers(0, VOCAB, (B, 2), dtype=np.int64)
    mixed_req = {sid: {"tokens": tok64x2[i:i + 1, : 1 + (i % 2)]} for i, sid in enumerate(sids)}
    padded_req = {sid: {"tokens": tok64x2[i:i + 1]} for i, sid in enumerate(sids)}

    many = interleaved({"raw ORT run, batch 64": raw_b64, "StreamPool.step, 64 streams": lambda: pool.step(req),
                        "StreamPool.step, 64 of 256 slots": lambda: big_pool.step(big_req),
                        "pool, lengths {1,2} grouped (2 calls)": lambda: pool.step(mixed_req),
                        "pool, all length 2 (1 call, = padding)": lambda: pool.step(padded_req)},
                       max(4, args.rounds // 4), 2)
    seq = interleaved({"64 x Stream.step one by one": one_by_one}, max(2, args.rounds // 2), 3, warmup=1)
    many.update(seq)

    # ---- our fixed per-call cost, where the engine's time does not drown it: a tiny LSTM LM -----------
    tiny_overhead_us = None
    try:
        from wmdeploy.exporter import export
        from wmdeploy.models.lstm_lm import LSTMLanguageModel

        export(LSTMLanguageModel.preset("tiny").eval(), tmp / "tiny.onnx", verify=False)
        tiny = wmdeploy.load(tmp / "tiny.onnx", threads=args.threads)
        ts, tst = tiny.stream(), [np.zeros(s.shape_for(1), np.float32) for s in tiny.spec.states]
        tsess = tiny.backend.session

        def tiny_raw() -> None:
            _, tst[0], tst[1] = tsess.run(None, {"tokens": tok1, "h": tst[0], "c": tst[1]})

        tt = interleaved({"tiny raw": tiny_raw, "tiny Stream.step": lambda: ts.step(tokens=tok1)}, 50, 20)
        tiny_overhead_us = (tt["tiny Stream.step"]["p50"] - tt["tiny raw"]["p50"]) * 1e6
        one.update(tt)
    except ImportError:
        pass

    # ---- machine baselines ------------------------------------------------------------------------------
    bw = bandwidth_gbs()
    mm = matmul_gflops(B, 2 * HIDDEN, 4 * HIDDEN)  # layer-2 gate matmul: [x, h] @ [W; R]^T at batch 64
    floor = weight_bytes / (bw * 1e9)
    state_bytes = model.spec.state_bytes_per_stream

    r = {k: v["p50"] for k, v in {**one, **many}.items()}
    rows = [
        ("batch 1, chunk 1", "raw ORT run loop (numpy state)", r["raw ORT run loop"] * 1e3, 1.0, ""),
        ("", "Stream.step", r["Stream.step"] * 1e3, r["Stream.step"] / r["raw ORT run loop"], "target <= 1.10x raw"),
        ("", "PyTorch eager", r["PyTorch eager"] * 1e3, r["PyTorch eager"] / r["Stream.step"],
         "eager / Stream.step, target >= 4x"),
        ("", "weight bytes / bandwidth floor", floor * 1e3, r["Stream.step"] / floor, "Stream.step / floor"),
        ("batch 64, chunk 1", "raw ORT run, batch 64", r["raw ORT run, batch 64"] * 1e3, 1.0, ""),
        ("", "StreamPool.step, 64 streams", r["StreamPool.step, 64 streams"] * 1e3,
         r["StreamPool.step, 64 streams"] / r["raw ORT run, batch 64"], "target <= 1.15x raw"),
        ("", "StreamPool.step, 64 of 256 slots", r["StreamPool.step, 64 of 256 slots"] * 1e3,
         r["StreamPool.step, 64 of 256 slots"] / r["raw ORT run, batch 64"], "gather/scatter path, vs raw"),
        ("", "64 x Stream.step one by one", r["64 x Stream.step one by one"] * 1e3,
         r["64 x Stream.step one by one"] / r["StreamPool.step, 64 streams"], "one-by-one / pool"),
        ("mixed lengths", "lengths {1,2}: grouped, 2 calls", r["pool, lengths {1,2} grouped (2 calls)"] * 1e3,
         r["pool, lengths {1,2} grouped (2 calls)"] / r["pool, all length 2 (1 call, = padding)"], "vs one padded-size call"),
        ("", "all length 2: 1 call", r["pool, all length 2 (1 call, = padding)"] * 1e3, 1.0, ""),
    ]
    pool_gflops = lstm_flops(B) / r["StreamPool.step, 64 streams"] / 1e9
    facts = {
        "model": built, "weight_bytes": weight_bytes, "state_bytes_per_stream": state_bytes,
        "bytes_moved_batch1": weight_bytes + 2 * state_bytes, "bandwidth_GBps(copy r+w)": bw,
        "batch1_floor_ms": floor * 1e3, "batch1_achieved_GBps": weight_bytes / r["Stream.step"] / 1e9,
        "pool64_GFLOPs": pool_gflops, "numpy_matmul_GFLOPs(64x2048 @ 2048x4096)": mm,
        "pool64_flop_fraction_of_matmul": pool_gflops / mm, "lstm_flops_batch64": lstm_flops(B),
        "tiny_model_Stream.step_minus_raw_us": tiny_overhead_us,
    }
    print(f"\nwmdeploy runtime bench: {built}; onnxruntime {ort.__version__}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print(f"{'case':<18} {'method':<36} {'p50 ms':>9} {'ratio':>7}  note")
    for case, method, ms, ratio, note in rows:
        print(f"{case:<18} {method:<36} {ms:9.3f} {ratio:7.2f}  {note}")
    print()
    for k, v in facts.items():
        print(f"  {k:<44} {v:,.3f}" if isinstance(v, float) else f"  {k:<44} {v:,}" if isinstance(v, int) else f"  {k:<44} {v}")
    result = {"timings": {**one, **many}, "rows": [dict(zip(("case", "method", "p50_ms", "ratio", "note"), row)) for row in rows],
              "facts": facts, "env": {"onnxruntime": ort.__version__, "torch": torch.__version__, "cpus": os.cpu_count(),
                                      "python": sys.version.split()[0]}}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
