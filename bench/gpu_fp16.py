"""fp16 on the GPU: `wmdeploy quantize --mode fp16` against float32 on ONNX Runtime's CUDA EP.

Run on a GPU machine with onnxruntime-gpu (see bench/gpu_check.sh for the set-up):
    python3 bench/gpu_fp16.py --json $OUT/fp16.json
Exports the 2 x 1024 LSTM LM, writes its fp16 copy, then times `Stream.step` (p50 of interleaved rounds)
for each file, at graph optimisation levels `all` and `basic`, with and without CUDA graphs, at batch 1
and 64, chunk 1; and streams both files side by side on the GPU to report the fp16 drift (top-1
agreement, worst state error). A cell that cannot run records its one-line error instead of a time.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved  # noqa: E402


def _export(workdir: Path) -> tuple[Path, Path]:
    import torch

    from wmdeploy.exporter import export
    from wmdeploy.models.zoo import build
    from wmdeploy.transform.quantizer import quantize

    torch.manual_seed(0)
    f32 = workdir / "lm.onnx"
    export(build("lstm_lm_2x1024").eval(), f32, verify=False)
    f16 = workdir / "lm.fp16.onnx"
    quantize(f32, f16, mode="fp16")
    return f32, f16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("bench/results/gpu_fp16.json"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cuda", help="cuda (the point); cpu only to smoke-test the script")
    args = ap.parse_args()
    import wmdeploy

    workdir = Path(tempfile.mkdtemp())
    f32, f16 = _export(workdir)
    rng = np.random.default_rng(0)
    rows = []
    for batch in (1, 64):
        runners: dict = {}
        for path in (f32, f16):
            for level in ("all", "basic"):
                for graph in (False, True):
                    label = f"{path.name} level={level} cuda_graph={graph}"
                    try:
                        extra = {"cuda_graph": True} if graph else {}
                        model = wmdeploy.load(path, device=args.device, graph_optimization_level=level, **extra)
                        stream = model.stream(batch=batch)
                        tokens = rng.integers(0, 256, size=(batch, 1))
                        stream.step(tokens=tokens)
                        runners[label] = lambda s=stream, t=tokens: s.step(tokens=t)
                    except Exception as exc:  # record why a cell cannot run, keep measuring the others
                        rows.append({"batch": batch, "cell": label, "error": " ".join(str(exc).split())[:300]})
        if runners:
            timed = interleaved(runners, rounds=5, per_round=max(1, args.steps // 5), warmup=10)
            for label, t in timed.items():
                rows.append({"batch": batch, "cell": label, "p50_ms": t["p50"] * 1e3, "p90_ms": t["p90"] * 1e3})
    # fp16 drift on the GPU: both files, same tokens, each carrying its own state
    drift = {}
    try:
        a = wmdeploy.load(f32, device=args.device, graph_optimization_level="basic").stream()
        b = wmdeploy.load(f16, device=args.device, graph_optimization_level="basic").stream()
        agree, n = 0, 256
        for _ in range(n):
            t = rng.integers(0, 256, size=(1, 1))
            la, lb = a.step(tokens=t)["logits"], b.step(tokens=t)["logits"]
            agree += int(np.argmax(la) == np.argmax(lb))
        worst = max(float(np.max(np.abs(a.state[k] - b.state[k])) / (np.max(np.abs(a.state[k])) + 1e-12)) for k in a.state)
        drift = {"steps": n, "top1_agreement": agree / n, "worst_state_rel": worst}
    except Exception as exc:
        drift = {"error": " ".join(str(exc).split())[:300]}
    sizes = {"float32_mb": f32.stat().st_size / 1e6, "fp16_mb": f16.stat().st_size / 1e6}
    print(f"{'batch':>5}  {'cell':58} {'p50 ms':>9}")
    for r in rows:
        print(f"{r['batch']:>5}  {r['cell']:58} {r['p50_ms']:9.4f}" if "p50_ms" in r else f"{r['batch']:>5}  {r['cell']:58} error: {r['error'][:120]}")
    print("sizes", sizes, "drift", drift)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "drift": drift, "sizes": sizes, "time": time.time()}, indent=1))
    print("wrote", args.json)


if __name__ == "__main__":
    main()
