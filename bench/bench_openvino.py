"""ONNX Runtime float32 / int8-dynamic against OpenVINO f32 / bf16, through Stream and StreamPool.

    python bench/bench_openvino.py [--json bench/results/openvino.json] [--rounds 5] [--seconds 0.25]

Model: the 2 x 1024 LSTM LM of the zoo (untrained; ``wmdeploy.models.lstm_lm`` preset ``2x1024``),
exported with ``wmdeploy.exporter.export``; its int8-dynamic version made with ``wmdeploy.quantize``.
Cells: batch 1 (a ``Stream`` of one sequence), 8 and 64 (a ``StreamPool`` of that many streams, every
stream stepping: the server's path) x chunk 1 and 16. Every step is timed alone; the four engines are
interleaved round by round so that machine noise (2 shared cores) hits them alike; p50 per cell.
Ratios are against ONNX Runtime float32 in the same cell of the same run: compare those, not absolute
times, across runs.

The floor of a cell is ``(weight bytes + 2 x batch x state bytes per stream) / copy bandwidth``: a step
reads its weights and reads and writes its state. bf16 halves the weight bytes (OpenVINO keeps the
matmul weights in bf16), int8 is the quantized file's own bytes. ``of floor`` = floor / p50.

Also: top-1 agreement and cross-entropy change of OpenVINO bf16 against ONNX Runtime float32 over 512
steps of the shipped trained text LM (the drift report of ``wmdeploy verify --backend openvino``).
Targets (issue 16; checked here, not in tests): bf16 pool of 64 at chunk 1 >= 1.8x ONNX Runtime float32,
batch-1 ``Stream.step`` >= 1.25x, top-1 >= 0.97.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_timing.py
from _timing import interleaved  # noqa: E402

BATCHES, CHUNKS = (1, 8, 64), (1, 16)
TARGETS = {("pool", 64, 1): 1.8, ("stream", 1, 1): 1.25}


def bandwidth_bytes_per_s(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Host memory bandwidth from a large numpy copy (bytes read + written per second), best of ``repeats``."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def weight_bytes(path: Path) -> int:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def build(tmp: Path) -> tuple[Path, Path]:
    import torch

    from wmdeploy import quantize
    from wmdeploy.exporter import export
    from wmdeploy.models.lstm_lm import LSTMLanguageModel

    torch.manual_seed(0)
    fp32 = tmp / "lm2x1024.onnx"
    export(LSTMLanguageModel.preset("2x1024").eval(), fp32, verify=False)
    int8 = tmp / "lm2x1024.int8.onnx"
    quantize(fp32, int8, mode="int8-dynamic")
    return fp32, int8


def step_fn(model: Any, batch: int, chunk: int, rng: np.random.Generator) -> Callable[[], Any]:
    """One timed call: ``Stream.step`` at batch 1, else a ``StreamPool`` step of ``batch`` streams."""
    vocab = int(model.spec.meta.get("vocab_size", 256))
    tokens = [rng.integers(0, vocab, size=(1, chunk), dtype=np.int64) for _ in range(8)]
    i = [0]
    if batch == 1:
        stream = model.stream()

        def one() -> Any:
            i[0] += 1
            return stream.step(tokens=tokens[i[0] % 8])
        return one
    pool = model.pool(capacity=batch, reserve=batch)
    sids = [pool.join() for _ in range(batch)]

    def many() -> Any:
        i[0] += 1
        return pool.step({sid: {"tokens": tokens[(i[0] + k) % 8]} for k, sid in enumerate(sids)})
    return many


def drift_top1(text_lm: Path) -> dict[str, Any]:
    from wmdeploy.transform.drift import ModelRunner, drift_report

    report = drift_report(ModelRunner(text_lm, "openvino", precision="bf16"), text_lm, steps=512)
    total = report._lm_total()
    return {"top1": report.top1(), "ce_ref": total.get("ce_ref"), "ce_cand": total.get("ce_cand"),
            "worst_state_rel": report.worst_rel("state"), "summary": report.summary()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench/results/openvino.json")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.25, help="target time of one engine's share of a round")
    ap.add_argument("--no-drift", action="store_true", help="skip the 512-step bf16 drift of the trained text LM")
    args = ap.parse_args(argv)

    import openvino

    import onnxruntime
    import wmdeploy

    tmp = Path(tempfile.mkdtemp(prefix="bench_ov_"))
    fp32, int8 = build(tmp)
    engines = {
        "ort-fp32": wmdeploy.load(fp32, backend="onnxruntime"),
        "ort-int8": wmdeploy.load(int8, backend="onnxruntime"),
        "ov-f32": wmdeploy.load(fp32, backend="openvino", precision="f32"),
        "ov-bf16": wmdeploy.load(fp32, backend="openvino", precision="bf16"),
    }
    w32 = weight_bytes(fp32)
    wbytes = {"ort-fp32": w32, "ort-int8": weight_bytes(int8), "ov-f32": w32, "ov-bf16": w32 // 2}
    state = engines["ort-fp32"].spec.state_bytes_per_stream
    bw = bandwidth_bytes_per_s()
    rng = np.random.default_rng(0)
    cells = []
    for batch in BATCHES:
        for chunk in CHUNKS:
            fns = {name: step_fn(m, batch, chunk, rng) for name, m in engines.items()}
            t0 = time.perf_counter()
            for _ in range(2):
                fns["ort-fp32"]()
            one = (time.perf_counter() - t0) / 2
            per_round = int(min(50, max(3, args.seconds / max(one, 1e-6))))
            res = interleaved(fns, rounds=args.rounds, per_round=per_round, warmup=5)
            base = res["ort-fp32"]["p50"]
            for name, r in res.items():
                floor = (wbytes[name] + 2 * batch * state) / bw
                cells.append({"engine": name, "mode": "stream" if batch == 1 else "pool", "batch": batch, "chunk": chunk,
                              "p50_ms": r["p50"] * 1e3, "p90_ms": r["p90"] * 1e3, "samples": r["n"],
                              "speedup_vs_ort_fp32": base / r["p50"], "floor_ms": floor * 1e3,
                              "of_floor": floor / r["p50"]})
            print(f"batch {batch} chunk {chunk}: " + ", ".join(f"{n} {r['p50'] * 1e3:.3g} ms" for n, r in res.items()), flush=True)

    print(f"\n2 x 1024 LSTM LM, p50 ms per step (speedup vs ONNX Runtime float32; of floor); copy bandwidth {bw / 1e9:.1f} GB/s")
    names = list(engines)
    print(f"| batch x chunk | {' | '.join(names)} |")
    print("|---|" + "---|" * len(names))
    for batch in BATCHES:
        for chunk in CHUNKS:
            row = [c for c in cells if c["batch"] == batch and c["chunk"] == chunk]
            print(f"| {batch} x {chunk} ({'Stream' if batch == 1 else 'pool'}) | " + " | ".join(
                f"{c['p50_ms']:.3g} ({c['speedup_vs_ort_fp32']:.2f}x; {c['of_floor'] * 100:.0f} %)" for c in row) + " |")
    checks = []
    for (mode, batch, chunk), need in TARGETS.items():
        c = next(c for c in cells if c["engine"] == "ov-bf16" and c["batch"] == batch and c["chunk"] == chunk)
        checks.append({"what": f"ov-bf16 {mode} batch {batch} chunk {chunk}", "speedup": c["speedup_vs_ort_fp32"],
                       "target": need, "ok": c["speedup_vs_ort_fp32"] >= need})
    drift = None
    if not args.no_drift:
        text_lm = tmp / "lm.onnx"
        from wmdeploy.exporter import export
        from wmdeploy.torch_module import load_module

        ckpt = Path(__file__).resolve().parent.parent / "models" / "checkpoints" / "lstm_lm.pt"
        export(load_module("wmdeploy.models.lstm_lm:LSTMLanguageModel", None, ckpt), text_lm, verify=False)
        drift = drift_top1(text_lm)
        checks.append({"what": "bf16 top-1 agreement, 512 steps of the trained text LM", "top1": drift["top1"],
                       "target": 0.97, "ok": drift["top1"] >= 0.97})
        print(f"\nbf16 drift: {drift['summary']}")
    print()
    for c in checks:
        got = f"{c['speedup']:.2f}x" if "speedup" in c else f"{c['top1']:.4f}"
        print(f"{'PASS' if c['ok'] else 'FAIL'}: {c['what']}: {got} (target {c['target']})")
    info = engines["ov-bf16"].describe()
    out = {"format": "wmdeploy.bench.openvino", "version": 1,
           "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                       "cpu": info.get("capabilities"), "bf16_units": info.get("bf16_units")},
           "versions": {"openvino": openvino.__version__, "onnxruntime": onnxruntime.__version__},
           "bandwidth_bytes_per_s": bw, "weight_bytes": wbytes, "state_bytes_per_stream": state,
           "selection": {n: m.selection for n, m in engines.items()}, "cells": cells, "checks": checks, "drift": drift}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
