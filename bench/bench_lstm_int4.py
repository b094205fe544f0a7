"""The zoo's 2 x 1024 LSTM LM in 4 bits (``quantize --mode int4 --lstm-as-matmuls``: the LSTM ops rewritten as
MatMuls + Scan, their weights MatMulNBits) against the same file's ``int8-dynamic`` (ONNX Runtime's fused
``DynamicQuantizeLSTM``) and float32 (the ``LSTM`` op, and the MatMul form unquantized).

    python bench/bench_lstm_int4.py [--json bench/results/lstm_int4.json] [--rounds 3] [--workdir DIR]

Cells: batch x chunk of 1 x 1 (batch-1 decode, what the issue asks), 1 x 16, 8 x 1 and 64 x 1, each the median
of 200 timed steps after 20 warm-up steps of a ``Stream``. Every file runs in its own process (after a 2 s pause),
the files alternating for ``--rounds`` rounds, 2 intra-op threads; a cell is its median round. CPU features:
int8 and int4 accuracy level 4 use AVX-512 VNNI here (AVX-VNNI/AVX2 elsewhere). Note that at 14 MB the int8
weights fit this CPU's 32 MiB L3 as well as the 9 MB int4 ones do: the 4-bit file is smaller, not faster.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench_hf  # noqa: E402  (run_worker: a worker in its own process)
from _timing import write_results  # noqa: E402
from bench_hf import THREADS  # noqa: E402

CELLS = ((1, 1), (1, 16), (8, 1), (64, 1))


def make_files(work: Path) -> dict[str, Path]:
    import onnx

    from wmdeploy.exporter import export
    from wmdeploy.models.zoo import build
    from wmdeploy.transform.lstm_cells import lstm_as_matmuls
    from wmdeploy.transform.quantizer import quantize

    files = {"fp32": work / "lstm.onnx", "fp32_matmuls": work / "lstm_matmuls.onnx",
             "int8": work / "lstm.int8.onnx", "int4_matmuls": work / "lstm.int4.onnx"}
    if not files["fp32"].is_file():
        export(build("lstm_lm_2x1024").eval(), files["fp32"], verify=False)  # untrained: the cost is the same
    if not files["fp32_matmuls"].is_file():
        model = onnx.load(str(files["fp32"]))
        lstm_as_matmuls(model)
        onnx.save(model, str(files["fp32_matmuls"]))
    if not files["int8"].is_file():
        quantize(files["fp32"], files["int8"], mode="int8-dynamic", check_steps=0)
    if not files["int4_matmuls"].is_file():
        quantize(files["fp32"], files["int4_matmuls"], mode="int4", lstm_as_matmuls=True, check_steps=0)
    return files


def worker(path: str) -> dict[str, float]:
    import wmdeploy

    model = wmdeploy.load(path, threads=THREADS)
    out = {}
    for batch, chunk in CELLS:
        stream = model.stream(batch=batch)
        x = np.full((batch, chunk), 5, dtype=np.int64)
        for _ in range(20):
            stream.step(tokens=x)
        times = []
        for _ in range(200):
            t0 = time.perf_counter()
            stream.step(tokens=x)
            times.append(time.perf_counter() - t0)
        out[f"{batch}x{chunk}"] = 1e3 * statistics.median(times)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "lstm_int4.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return 0
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_lstm_int4_"))
    work.mkdir(parents=True, exist_ok=True)
    files = make_files(work)
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in files}
    for r in range(args.rounds):
        for key, path in files.items():  # its own process, after bench_hf's pause
            runs[key].append(bench_hf.run_worker(__file__, str(path)))
        print(f"  round {r + 1}/{args.rounds} done", flush=True)
    cells = [f"{b}x{c}" for b, c in CELLS]
    result: dict[str, Any] = {k: {c: statistics.median(x[c] for x in v) for c in cells} for k, v in runs.items()}
    sizes = {k: p.stat().st_size for k, p in files.items()}
    print(f"| file | MB | {' | '.join(f'{c} ms' for c in cells)} |")
    print(f"|---|---|{'---|' * len(cells)}")
    for key in files:
        print(f"| {key} | {sizes[key] / 1e6:.1f} | {' | '.join(f'{result[key][c]:.3f}' for c in cells)} |")
    ratios = {c: result["int8"][c] / result["int4_matmuls"][c] for c in cells}
    print("  int4_matmuls speed over int8: " + ", ".join(f"{c} {v:.2f}" for c, v in ratios.items()))
    return write_results(args.json, {"cells_ms": result, "rounds": runs, "bytes": sizes,
                                     "int4_matmuls_speed_over_int8": ratios, "threads": THREADS})


if __name__ == "__main__":
    sys.exit(main())
