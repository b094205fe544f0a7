"""Language-model decode: wmdeploy fp32 / int4 (ONNX Runtime, OpenVINO) against ONNX Runtime GenAI fp32 / int4.

    python bench/bench_lm.py [--json bench/results/lm.json] [--steps 48] [--streams 16] [--rounds 3] [--workdir DIR]

The model is bench_hf.py's ~107M-parameter Qwen3-shaped random-init folder (8 layers x 1024, 16 q / 8 kv heads
of 64, MLP 2048, vocabulary 32,000, tied embeddings), built, exported and timed with bench_hf's own helpers
(imported, not copied). Files:

* wmdeploy fp32: ``export hf: --max-context 4096`` (GroupQueryAttention, the KV cache in place);
* wmdeploy int4: ``quantize --mode int4`` of it with the defaults (block 32, symmetric, accuracy level 4), plus
  two one-stream rows that justify the defaults (block 128; accuracy level 0, i.e. fp32 compute);
* wmdeploy int4 on OpenVINO: ``export hf: --attention portable --max-context 256`` quantized the same way
  (OpenVINO's ONNX frontend reads MatMulNBits / GatherBlockQuantized as compressed weights), bf16 activations;
  capacity 256 because the portable form copies and attends over its whole capacity every step;
* GenAI: its builder on the same folder, ``-p fp32`` and ``-p int4`` (its defaults), ``max_length`` 4096.

Rows: batch-1 decode (a 64-token prompt, then ``--steps`` greedy steps, each timed; median) and, for wmdeploy,
``--streams`` streams at different positions (64 + 8 i) stepping together (aggregate tokens/s). Every engine
runs in its own process (ONNX Runtime's spinning threads would steal the cores of an engine timed after it),
the engines alternating for ``--rounds`` rounds, 2 intra-op threads each; a row is its median round. The floor
per row is the bytes of weights a step reads (the file's initializers; the embedding table counts fully,
though a step reads one row of it) over the measured copy bandwidth. Ratios compare this run only.
CPU features: int4 accuracy level 4 runs int8 dot products (AVX-512 VNNI on this EPYC; AVX-VNNI / AVX2 paths
elsewhere, slower); OpenVINO bf16 needs AVX512-BF16 or AMX (else it runs f32); fp32 rows use AVX-512 FMA.
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_hf  # noqa: E402  (the folder, the GenAI build and the ORT/GenAI workers)
from _timing import write_results  # noqa: E402
from bench_hf import PROMPT, THREADS  # noqa: E402

ROOT = bench_hf.ROOT
CAPACITY = 4096
OV_CAPACITY = 256


# ---- files ------------------------------------------------------------------------------------------------------
def make_files(folder: Path, work: Path) -> dict[str, Path]:
    import wmdeploy
    from wmdeploy.transform.quantizer import quantize

    files = {"fp32": work / "qwen3_4096.onnx", "portable": work / "qwen3_portable_256.onnx"}
    if not files["fp32"].is_file():
        wmdeploy.export_hf(folder, files["fp32"], max_context=CAPACITY, attention="gqa", verify=False)
    if not files["portable"].is_file():
        wmdeploy.export_hf(folder, files["portable"], max_context=OV_CAPACITY, attention="portable", verify=False)
    variants = {"int4": ("fp32", {}), "int4_b128": ("fp32", {"block_size": 128}),
                "int4_acc0": ("fp32", {"accuracy_level": 0}), "ov_int4": ("portable", {})}
    for key, (base, opts) in variants.items():
        files[key] = work / f"qwen3_{key}.onnx"
        if not files[key].is_file():
            t0 = time.perf_counter()
            quantize(files[base], files[key], mode="int4", check_steps=8 if key == "int4" else 0, **opts)
            print(f"  quantize int4 {opts or '(defaults)'}: {time.perf_counter() - t0:.0f} s", flush=True)
    return files


def weight_bytes(path: Path) -> int:
    """Bytes of initializers in an ONNX file (external data included): what a decode step streams from memory."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        ext = {e.key: e.value for e in init.external_data}
        total += int(ext["length"]) if "length" in ext else len(init.raw_data) or init.ByteSize()
    return total


def genai_weight_bytes(folder: Path) -> int:
    return sum(weight_bytes(p) for p in folder.glob("*.onnx"))


# ---- workers: bench_hf's, on ONNX Runtime, GenAI, and OpenVINO bf16 ----------------------------------------------
_OV = {"backend": "openvino", "precision": "bf16"}


WORKERS = {"stream": bench_hf.worker_stream, "pool": bench_hf.worker_pool, "genai": bench_hf.worker_genai,
           "ov_stream": functools.partial(bench_hf.worker_stream, **_OV),
           "ov_pool": functools.partial(bench_hf.worker_pool, **_OV)}


# ---- the run ----------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "lm.json")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="each engine runs this many times, alternating")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the folder and files here (reused when present)")
    ap.add_argument("--no-genai", action="store_true")
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, path, steps, *rest = args.worker
        print(json.dumps(WORKERS[kind](path, int(steps), *map(int, rest))))
        return 0

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_lm_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"building the folder and files in {work}", flush=True)
    folder = work / "qwen3-100m"
    model_info = bench_hf.build_folder(folder)
    files = make_files(folder, work)
    genai: dict[str, Path] = {}
    if not args.no_genai:
        try:
            import onnxruntime_genai  # noqa: F401

            bench_hf.CAPACITIES = (CAPACITY,)  # _genai_settings sets max_length to max(CAPACITIES)
            for prec in ("fp32", "int4"):
                built = bench_hf.build_genai(folder, work / f"genai_{prec}", prec)
                if built is not None:
                    genai[prec] = built
        except ImportError:
            print("  onnxruntime-genai is not installed: no GenAI rows", flush=True)
    openvino = not args.no_openvino
    if openvino:
        try:
            import openvino as _ov  # noqa: F401
        except ImportError:
            openvino = False

    s, n = str(args.steps), str(args.streams)
    jobs: dict[str, tuple[tuple[str, ...], str, Path]] = {  # key -> (worker args, row name, file whose weights it reads)
        "wm_fp32_1": (("stream", str(files["fp32"]), s), "wmdeploy fp32, ONNX Runtime, 1 stream", files["fp32"]),
        "wm_int4_1": (("stream", str(files["int4"]), s), "wmdeploy int4 (block 32, sym, acc 4), ONNX Runtime, 1 stream", files["int4"]),
        "wm_int4_b128_1": (("stream", str(files["int4_b128"]), s), "wmdeploy int4 block 128, ONNX Runtime, 1 stream", files["int4_b128"]),
        "wm_int4_acc0_1": (("stream", str(files["int4_acc0"]), s), "wmdeploy int4 accuracy level 0 (fp32 compute), 1 stream", files["int4_acc0"]),
        "wm_fp32_n": (("pool", str(files["fp32"]), s, n), f"wmdeploy fp32, ONNX Runtime, {n} streams", files["fp32"]),
        "wm_int4_n": (("pool", str(files["int4"]), s, n), f"wmdeploy int4, ONNX Runtime, {n} streams", files["int4"]),
        "wm_int4_64": (("pool", str(files["int4"]), s, "64"), "wmdeploy int4, ONNX Runtime, 64 streams", files["int4"]),
    }
    if openvino:
        jobs["wm_ov_int4_1"] = (("ov_stream", str(files["ov_int4"]), s), "wmdeploy int4, OpenVINO bf16, 1 stream (cap 256)", files["ov_int4"])
        jobs["wm_ov_int4_n"] = (("ov_pool", str(files["ov_int4"]), s, n), f"wmdeploy int4, OpenVINO bf16, {n} streams (cap 256)", files["ov_int4"])
    for prec, path in genai.items():
        jobs[f"genai_{prec}_1"] = (("genai", str(path), s), f"ONNX Runtime GenAI {prec} (its builder), 1 stream", path)

    from wmdeploy.profiling.machine import cpu_bandwidth

    bandwidth = cpu_bandwidth(max_threads=THREADS)
    # one engine failing must not lose the others' numbers
    results = bench_hf.alternate(__file__, {k: job for k, (job, _, _) in jobs.items()}, args.rounds, tolerate=True)
    for key, r in results.items():
        path = jobs[key][2]
        wbytes = genai_weight_bytes(path) if path.is_dir() else weight_bytes(path)
        r.update(weight_bytes=wbytes, floor_ms=1e3 * wbytes / bandwidth.bytes_per_s)

    def ratio(a: str, b: str) -> float | None:
        return results[a]["tokens_per_s"] / results[b]["tokens_per_s"] if a in results and b in results else None

    ratios = {
        "int4_file_over_fp32_file_bytes": files["int4"].stat().st_size / files["fp32"].stat().st_size,
        "wm_int4_1_over_genai_int4_1": ratio("wm_int4_1", "genai_int4_1"),
        "wm_fp32_1_over_genai_fp32_1": ratio("wm_fp32_1", "genai_fp32_1"),
        "wm_int4_n_over_genai_int4_1": ratio("wm_int4_n", "genai_int4_1"),
        "wm_int4_n_over_wm_int4_1": ratio("wm_int4_n", "wm_int4_1"),
        "wm_int4_64_over_genai_int4_1": ratio("wm_int4_64", "genai_int4_1"),
        "wm_int4_1_over_wm_fp32_1": ratio("wm_int4_1", "wm_fp32_1"),
        "wm_int4_b128_1_over_wm_int4_1": ratio("wm_int4_b128_1", "wm_int4_1"),
        "wm_int4_acc0_1_over_wm_int4_1": ratio("wm_int4_acc0_1", "wm_int4_1"),
        "wm_ov_int4_1_over_wm_int4_1": ratio("wm_ov_int4_1", "wm_int4_1"),
    }
    if "wm_int4_1" in results and "genai_int4_1" in results:
        ratios["greedy_int4_equal_genai_int4"] = results["wm_int4_1"]["greedy"] == results["genai_int4_1"]["greedy"]

    print(f"\n{model_info['weights_mb']} MB of fp32 weights in the folder; context {PROMPT} -> {PROMPT + args.steps}; "
          f"{THREADS} threads; copy bandwidth {bandwidth.gb_per_s:.1f} GB/s; {platform.processor() or platform.machine()}")
    print(f"| {'engine':<62} | ms/step | tok/s | weights MB | floor ms |")
    print(f"|{'-' * 64}|---------|-------|------------|----------|")
    for key, r in results.items():
        ms = r.get("ms_per_token", r.get("ms_per_step"))
        print(f"| {jobs[key][1]:<62} | {ms:7.2f} | {r['tokens_per_s']:5.0f} | {r['weight_bytes'] / 1e6:10.1f} | {r['floor_ms']:8.2f} |")
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}" if isinstance(v, float) else f"  {k}: {v}")
    return write_results(args.json, {"model": model_info, "steps": args.steps, "streams": args.streams,
                                     "rounds": args.rounds, "prompt": PROMPT, "threads": THREADS,
                                     "bandwidth": bandwidth.to_dict(), "results": results, "ratios": ratios,
                                     "rows": {k: jobs[k][1] for k in results}})


if __name__ == "__main__":
    sys.exit(main())
