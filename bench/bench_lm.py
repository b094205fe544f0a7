"""Language-model decode on four random-init Hugging Face folders: wmdeploy fp32 / int8 / int4 (ONNX Runtime,
OpenVINO) against ONNX Runtime GenAI, OpenVINO GenAI and llama.cpp on the same weights.

    python bench/bench_lm.py [--json bench/results/lm.json] [--models qwen3-100m,qwen3-470m,mamba2-110m,lfm2-110m]
                             [--steps 48] [--streams 16] [--rounds 3] [--workdir DIR] [--no-genai] [--no-openvino]
                             [--no-peers]

Folders (``_lm_folders.py``; vocabulary 32,000, tied embeddings): Qwen3-shaped ~108M (bench_hf's: 8 layers x
1024, 16 q / 8 kv heads of 64, MLP 2048) and ~473M (28 layers, MLP 4096), a Mamba2 (~112M) and an LFM2 (~114M).
Files per folder, built once into ``--workdir``:

* wmdeploy fp32: ``export hf: --max-context 4096`` (GroupQueryAttention, the KV cache in place);
* wmdeploy int4: ``quantize --mode int4`` with the defaults (block 32, symmetric, accuracy level 4); for the
  100M folder also block 128 and accuracy level 0 (fp32 compute), the rows that justify the defaults;
* wmdeploy int8: ``quantize --mode int8-dynamic`` (100M folder): ONNX Runtime's VNNI int8 GEMM, which at 16 rows
  does ~2.5x the int4 kernel's work per second here (MatMulNBits ~500 GOPS, MatMulInteger ~1,300), so it is
  the file to serve many streams from;
* wmdeploy int4 on OpenVINO (100M): ``--attention portable --max-context 256`` quantized the same way, bf16
  activations (capacity 256 because the portable form copies and attends over its whole capacity every step);
* peers, where installed (``pip install -r bench/requirements-peers.txt``; never the package's dependencies):
  ONNX Runtime GenAI's builder (``-p fp32``, ``-p int4``, ``max_length`` 4096; Qwen3 and LFM2), llama.cpp
  (``_peer_llamacpp.py``: llama-cpp-python; F32 GGUF from its own ``convert_hf_to_gguf.py``, Q4_0 from its own
  quantizer, which keeps the tied embedding / head in Q6_K; f16 KV cache, its defaults) and OpenVINO GenAI
  (``_peer_openvino_genai.py``, Qwen3 only: its GGUF reader on llama.cpp's very files, F16 for the fp32 row as it
  refuses F32; ``LLMPipeline`` at batch 1 with its default PagedAttention backend, ``ContinuousBatchingPipeline``
  for the concurrent rows; bf16 activations and a u8 KV cache, its CPU defaults). GenAI's CPU generator has no
  continuous batching, so it has batch-1 rows only.

Rows: batch 1 (a 64-token prompt, timed after a warm-up prompt: prefill tok/s; then ``--steps`` greedy steps,
each timed: the median is ms/token) and ``--streams`` / 64 streams at different positions (64 + 8 i) stepping
together (aggregate decode tokens/s). Every engine runs in its own process (ONNX Runtime's spinning threads
would steal the cores of an engine timed after it), the engines alternating for ``--rounds`` rounds with a
2 s pause before each, 2 threads each; a row is its median round. The floor per row is the bytes of weights a
step reads (the file's initializers; the embedding table counts fully, though a step reads one row of it)
over the measured copy bandwidth; concurrent rows also read their KV caches, which the floor leaves out.
Ratios compare this run only. CPU features: int4 accuracy level 4 and int8 run int8 dot products (AVX-512 VNNI
on this EPYC; AVX-VNNI / AVX2 paths elsewhere, slower); OpenVINO bf16 needs AVX512-BF16 or AMX (else f32);
fp32 rows use AVX-512 FMA.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _lm_folders  # noqa: E402
import bench_hf  # noqa: E402  (the GenAI build and the ORT/GenAI workers)
from _timing import write_results  # noqa: E402
from bench_hf import PROMPT, THREADS  # noqa: E402

ROOT = bench_hf.ROOT
CAPACITY = 4096
OV_CAPACITY = 256
MAIN = "qwen3-100m"  # the folder with every row; the others get the rows that say how the picture scales
GENAI_FAMILIES = ("qwen3", "lfm2")  # what GenAI's builder takes of ours (it has no Mamba2)
PEERS = {"ovgenai": "_peer_openvino_genai", "llama": "_peer_llamacpp"}
PEER_FAMILIES = {"ovgenai": ("qwen3",), "llama": ("qwen3", "mamba2", "lfm2")}  # GenAI's GGUF reader: Qwen, Llama


# ---- files ------------------------------------------------------------------------------------------------------
def make_files(name: str, folder: Path, work: Path) -> dict[str, Path]:
    import wmdeploy
    from wmdeploy.transform.quantizer import quantize

    files = {"fp32": work / f"{name}_fp32.onnx"}
    if not files["fp32"].is_file():
        t0 = time.perf_counter()
        wmdeploy.export_hf(folder, files["fp32"], max_context=CAPACITY, attention="gqa", verify=False)
        print(f"  {name}: exported in {time.perf_counter() - t0:.0f} s", flush=True)
    variants: dict[str, tuple[str, str, dict[str, Any]]] = {"int4": ("fp32", "int4", {})}
    if name == MAIN:
        files["portable"] = work / f"{name}_portable_{OV_CAPACITY}.onnx"
        if not files["portable"].is_file():
            wmdeploy.export_hf(folder, files["portable"], max_context=OV_CAPACITY, attention="portable", verify=False)
        variants.update({"int8": ("fp32", "int8-dynamic", {}), "int4_b128": ("fp32", "int4", {"block_size": 128}),
                         "int4_acc0": ("fp32", "int4", {"accuracy_level": 0}), "ov_int4": ("portable", "int4", {}),
                         "ov_int8": ("portable", "int8-dynamic", {})})
    for key, (base, mode, opts) in variants.items():
        files[key] = work / f"{name}_{key}.onnx"
        if not files[key].is_file():
            t0 = time.perf_counter()
            quantize(files[base], files[key], mode=mode, check_steps=8 if key == "int4" else 0, **opts)
            print(f"  {name}: quantize {mode} {opts or '(defaults)'}: {time.perf_counter() - t0:.0f} s", flush=True)
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


def file_bytes(path: Path) -> int:
    """A peer's model on disk (a folder of files, or one file): what it reads per step, near enough."""
    if path.is_dir():
        onnx_files = list(path.glob("*.onnx"))
        if onnx_files:
            return sum(weight_bytes(p) for p in onnx_files)
        return sum(p.stat().st_size for p in path.glob("*.bin"))
    return weight_bytes(path) if path.suffix == ".onnx" else path.stat().st_size


# ---- workers: bench_hf's, on ONNX Runtime, GenAI, and OpenVINO bf16; the peers' modules -----------------------------
_OV = {"backend": "openvino", "precision": "bf16"}


def worker(kind: str, path: str, steps: int, *rest: int) -> dict[str, Any]:
    if kind in ("stream", "pool", "genai"):
        return getattr(bench_hf, f"worker_{kind}")(path, steps, *rest)
    if kind in ("ov_stream", "ov_pool"):
        return getattr(bench_hf, f"worker_{kind[3:]}")(path, steps, *rest, **_OV)
    peer, _, what = kind.partition("_")  # "ovgenai_stream", "llama_pool", ...
    return getattr(importlib.import_module(PEERS[peer]), f"worker_{what}")(path, steps, *rest)


def peer_files(info: dict[str, Any], folder: Path, work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Each peer's build of ``folder`` ("genai_fp32", "ovgenai_int4", "llama_int4", ...), where it installs."""
    built: dict[str, Path] = {}
    if not args.no_genai and info["family"] in GENAI_FAMILIES:
        try:
            import onnxruntime_genai  # noqa: F401

            bench_hf.CAPACITIES = (CAPACITY,)  # _genai_settings sets max_length to max(CAPACITIES)
            for prec in ("fp32", "int4"):
                path = bench_hf.build_genai(folder, work / f"{info['name']}_genai_{prec}", prec)
                if path is not None:
                    built[f"genai_{prec}"] = path
        except ImportError:
            print("  onnxruntime-genai is not installed: no GenAI rows", flush=True)
    if args.no_peers:
        return built
    for peer, module in PEERS.items():
        if info["family"] not in PEER_FAMILIES[peer]:
            continue
        try:
            mod = importlib.import_module(module)
            for prec in ("fp32", "int4"):  # both peers read llama.cpp's GGUF files: one folder, shared
                path = mod.build(folder, work / f"{info['name']}_gguf", prec)
                if path is not None:
                    built[f"{peer}_{prec}"] = path
        except ImportError as exc:
            print(f"  {module}: {exc}; no {peer} rows", flush=True)
        except Exception as exc:  # a peer that cannot convert this family loses its rows, not the run
            print(f"  {peer} cannot build {info['name']}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    return built


PEER_NAMES = {"genai": "ONNX Runtime GenAI", "ovgenai": "OpenVINO GenAI", "llama": "llama.cpp"}


def jobs_for(name: str, files: dict[str, Path], peers: dict[str, Path], s: str, n: str,
             openvino: bool) -> dict[str, tuple[tuple[str, ...], str, Path]]:
    """key -> (worker args, row name, what it reads)."""
    jobs: dict[str, tuple[tuple[str, ...], str, Path]] = {}

    def add(key: str, kind: str, path: Path, row: str, *extra: str) -> None:
        jobs[f"{name}:{key}"] = ((kind, str(path), s, *extra), row, path)

    add("wm_fp32_1", "stream", files["fp32"], "wmdeploy fp32, ORT, 1 stream")
    add("wm_int4_1", "stream", files["int4"], "wmdeploy int4, ORT, 1 stream")
    add("wm_int4_n", "pool", files["int4"], f"wmdeploy int4, ORT, {n} streams", n)
    if name == MAIN:
        add("wm_int8_1", "stream", files["int8"], "wmdeploy int8, ORT, 1 stream")
        add("wm_int4_b128_1", "stream", files["int4_b128"], "wmdeploy int4 block 128, ORT, 1 stream")
        add("wm_int4_acc0_1", "stream", files["int4_acc0"], "wmdeploy int4 acc. level 0 (fp32 math), 1 stream")
        add("wm_fp32_n", "pool", files["fp32"], f"wmdeploy fp32, ORT, {n} streams", n)
        add("wm_int8_n", "pool", files["int8"], f"wmdeploy int8, ORT, {n} streams", n)
        add("wm_int4_64", "pool", files["int4"], "wmdeploy int4, ORT, 64 streams", "64")
        add("wm_int8_64", "pool", files["int8"], "wmdeploy int8, ORT, 64 streams", "64")
        if openvino:
            add("wm_ov_fp32_1", "ov_stream", files["portable"], "wmdeploy fp32, OpenVINO bf16, 1 stream (cap 256)")
            add("wm_ov_int8_1", "ov_stream", files["ov_int8"], "wmdeploy int8, OpenVINO bf16, 1 stream (cap 256)")
            add("wm_ov_int4_1", "ov_stream", files["ov_int4"], "wmdeploy int4, OpenVINO bf16, 1 stream (cap 256)")
            add("wm_ov_int4_n", "ov_pool", files["ov_int4"], f"wmdeploy int4, OpenVINO bf16, {n} streams (cap 256)", n)
    for key, path in peers.items():
        peer, _, prec = key.partition("_")
        label = f"{PEER_NAMES[peer]} {prec}"
        add(f"{key}_1", "genai" if peer == "genai" else f"{peer}_stream", path, f"{label}, 1 stream")
        if peer != "genai" and name == MAIN and prec == "int4":  # GenAI's CPU generator has no continuous batching
            add(f"{key}_n", f"{peer}_pool", path, f"{label}, {n} streams", n)
            add(f"{key}_64", f"{peer}_pool", path, f"{label}, 64 streams", "64")
    return jobs
# ---- the run ----------------------------------------------------------------------------------------------------
RATIOS = {  # name -> (row, over row), within one folder
    "wm_int4_1_over_genai_int4_1": ("wm_int4_1", "genai_int4_1"),
    "wm_fp32_1_over_genai_fp32_1": ("wm_fp32_1", "genai_fp32_1"),
    "wm_int4_n_over_genai_int4_1": ("wm_int4_n", "genai_int4_1"),
    "wm_int8_n_over_genai_int4_1": ("wm_int8_n", "genai_int4_1"),
    "wm_int8_64_over_genai_int4_1": ("wm_int8_64", "genai_int4_1"),
    "wm_int4_n_over_wm_int4_1": ("wm_int4_n", "wm_int4_1"),
    "wm_int4_1_over_wm_fp32_1": ("wm_int4_1", "wm_fp32_1"),
    "wm_int4_b128_1_over_wm_int4_1": ("wm_int4_b128_1", "wm_int4_1"),
    "wm_int4_acc0_1_over_wm_int4_1": ("wm_int4_acc0_1", "wm_int4_1"),
    "wm_ov_int4_1_over_wm_int4_1": ("wm_ov_int4_1", "wm_int4_1"),
    "wm_int4_1_over_ovgenai_int4_1": ("wm_int4_1", "ovgenai_int4_1"),
    "wm_int4_1_over_llama_int4_1": ("wm_int4_1", "llama_int4_1"),
    "wm_int8_n_over_ovgenai_int4_n": ("wm_int8_n", "ovgenai_int4_n"),
    "wm_int4_n_over_ovgenai_int4_n": ("wm_int4_n", "ovgenai_int4_n"),
    "wm_int8_n_over_llama_int4_n": ("wm_int8_n", "llama_int4_n"),
    "wm_int8_64_over_ovgenai_int4_64": ("wm_int8_64", "ovgenai_int4_64"),
    "wm_int8_64_over_llama_int4_64": ("wm_int8_64", "llama_int4_64"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "lm.json")
    ap.add_argument("--models", default=",".join(_lm_folders.MODELS), help="comma-separated, of " + ", ".join(_lm_folders.MODELS))
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="each engine runs this many times, alternating")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the folders and files here (reused when present)")
    ap.add_argument("--build-only", action="store_true", help="build the folders and every engine's files, time nothing")
    ap.add_argument("--no-genai", action="store_true")
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument("--no-peers", action="store_true", help="no OpenVINO GenAI and llama.cpp rows")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, path, steps, *rest = args.worker
        print(json.dumps(worker(kind, path, int(steps), *map(int, rest))))
        return 0
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in _lm_folders.MODELS]
    if unknown:
        ap.error(f"--models {unknown}: expected some of {list(_lm_folders.MODELS)}")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_lm_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"building the folders and files in {work}", flush=True)
    openvino = not args.no_openvino
    if openvino:
        try:
            import openvino as _ov  # noqa: F401
        except ImportError:
            openvino = False
    s, n = str(args.steps), str(args.streams)
    models: dict[str, Any] = {}
    jobs: dict[str, tuple[tuple[str, ...], str, Path]] = {}
    sizes: dict[str, dict[str, float]] = {}
    for name in names:
        folder = work / name
        models[name] = _lm_folders.build(name, folder)
        files = make_files(name, folder, work)
        sizes[name] = {"int4_file_over_fp32_file_bytes": files["int4"].stat().st_size / files["fp32"].stat().st_size}
        jobs.update(jobs_for(name, files, peer_files(models[name], folder, work, args), s, n, openvino))
    if args.build_only:
        print(f"{len(jobs)} rows ready: " + ", ".join(jobs))
        return 0

    from wmdeploy.profiling.machine import cpu_bandwidth

    bandwidth = cpu_bandwidth(max_threads=THREADS)
    # one engine failing must not lose the others' numbers
    results = bench_hf.alternate(__file__, {k: job for k, (job, _, _) in jobs.items()}, args.rounds, tolerate=True)
    for key, r in results.items():
        wbytes = file_bytes(jobs[key][2])
        r.update(weight_bytes=wbytes, floor_ms=1e3 * wbytes / bandwidth.bytes_per_s)
    ratios: dict[str, dict[str, Any]] = {}
    for name in names:
        got = {k.split(":", 1)[1]: v for k, v in results.items() if k.startswith(name + ":")}
        ratios[name] = dict(sizes[name])
        for label, (a, b) in RATIOS.items():
            if a in got and b in got:
                ratios[name][label] = got[a]["tokens_per_s"] / got[b]["tokens_per_s"]
        for peer in ("genai_int4_1", "llama_int4_1", "ovgenai_int4_1"):
            if "wm_int4_1" in got and peer in got and "greedy" in got[peer]:
                ratios[name][f"greedy_wm_int4_equals_{peer}"] = got["wm_int4_1"]["greedy"] == got[peer]["greedy"]
    print(f"\ncontext {PROMPT} -> {PROMPT + args.steps}; {THREADS} threads; copy bandwidth {bandwidth.gb_per_s:.1f} GB/s; "
          f"{platform.processor() or platform.machine()}")
    for name in names:
        info = models[name]
        print(f"\n{name}: {info['shape']}, {info['weights_mb']} MB of fp32 weights in the folder")
        print(f"| {'engine':<58} | ms/step | tok/s | prefill tok/s | weights MB | floor ms |")
        print(f"|{'-' * 60}|---------|-------|---------------|------------|----------|")
        for key, r in results.items():
            if not key.startswith(name + ":"):
                continue
            ms = r.get("ms_per_token", r.get("ms_per_step"))
            pre = r.get("prefill_tokens_per_s")
            print(f"| {jobs[key][1]:<58} | {ms:7.2f} | {r['tokens_per_s']:5.0f} | {f'{pre:,.0f}' if pre else '':>13} | "
                  f"{r['weight_bytes'] / 1e6:10.1f} | {r['floor_ms']:8.2f} |")
        for k, v in ratios[name].items():
            print(f"  {k}: {v:.2f}" if isinstance(v, float) else f"  {k}: {v}")
    return write_results(args.json, {"models": models, "steps": args.steps, "streams": args.streams,
                                     "rounds": args.rounds, "prompt": PROMPT, "threads": THREADS,
                                     "bandwidth": bandwidth.to_dict(), "results": results, "ratios": ratios,
                                     "rows": {k: jobs[k][1] for k in results}})


if __name__ == "__main__":
    sys.exit(main())
