"""Language-model decode of an ``export hf:`` file against ONNX Runtime GenAI's own build of the same folder.

    python bench/bench_hf.py [--json bench/results/hf.json] [--steps 48] [--streams 16] [--no-genai]

Model: a ~107M-parameter Qwen3-shaped random-init folder built here (8 layers x hidden 1024, 16 query / 8 KV
heads of 64, MLP 2048, vocabulary 32,000 with tied embeddings; float32, 427 MB of weights) and saved with
``save_pretrained`` beside a small BPE tokenizer (tests/_hf_folders.py). wmdeploy exports it twice,
``--max-context 256`` and ``--max-context 4096`` (``--attention gqa``: the KV cache written in place);
ONNX Runtime GenAI's model builder (``python -m onnxruntime_genai.models.builder -p fp32 -e cpu``) builds it
once, if ``onnxruntime-genai`` is installed (bench only: never a dependency of wmdeploy).

Rows (greedy decode, the next token fed back, every step timed on its own after a warm-up; medians):

* ``1 stream``: a 64-token prompt prefilled, then ``--steps`` single-token steps (context 64 -> 64 + steps);
* ``N streams``: a pool of ``--streams`` streams prefilled to different positions (64 + 8 i tokens), then
  ``--steps`` pool steps of one token per stream (tokens/s counts every stream's tokens);
* GenAI: its generator, the same prompt, ``generate_next_token`` per step (its KV buffer is ``max_length``
  = 4096, shared by past and present).

Every engine runs in its own process, one after the other, the engines alternating for ``--rounds`` rounds
(ONNX Runtime's intra-op threads spin after a run and would steal the cores from an engine timed after it in
the same process; the machine's speed drifts between minutes), each with 2 intra-op threads; a row is its
median round.
Ratios compare numbers of this run only. The CPU features used: fp32 only (AVX-512 FMA on this EPYC);
no bf16/VNNI path is involved.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from _timing import write_results  # noqa: E402
PROMPT = 64          # the context a decode step starts from
POOL_SPREAD = 8      # stream i of the pool holds PROMPT + POOL_SPREAD * i tokens before the timed steps
THREADS = 2
CAPACITIES = (256, 4096)


# ---- the folder and the files ---------------------------------------------------------------------------------
def build_folder(path: Path) -> dict[str, Any]:
    import transformers

    sys.path.insert(0, str(ROOT))
    from tests._hf_folders import save_folder

    config = transformers.Qwen3Config(
        vocab_size=32000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config.architectures = ["Qwen3ForCausalLM"]
    if not (path / "config.json").is_file():
        save_folder(config, path)
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {"family": "qwen3", "layers": 8, "hidden": 1024, "heads": "16 q / 8 kv x 64", "mlp": 2048,
            "vocab": 32000, "weights_mb": round(weights / 1e6, 1)}


def export_files(folder: Path, out: Path) -> dict[int, Path]:
    import wmdeploy

    files = {}
    for cap in CAPACITIES:
        path = out / f"qwen3_{cap}.onnx"
        if not path.is_file():
            t0 = time.perf_counter()
            wmdeploy.export_hf(folder, path, max_context=cap, attention="gqa", verify=False)
            print(f"  exported --max-context {cap} in {time.perf_counter() - t0:.0f} s", flush=True)
        files[cap] = path
    return files


def build_genai(folder: Path, out: Path, precision: str = "fp32") -> Path | None:
    """GenAI's builder on ``folder`` (``-p fp32`` or ``int4``, its own defaults otherwise), in its own process."""
    if (out / "genai_config.json").is_file():
        return _genai_settings(out)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out), "-p", precision,
           "-e", "cpu", "--extra_options", "hf_token=false"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        print(f"  GenAI's builder failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    print(f"  GenAI builder: {time.perf_counter() - t0:.0f} s", flush=True)
    return _genai_settings(out)


def _genai_settings(out: Path) -> Path:
    """The same KV buffer as the 4096 file and the same thread count as ours (GenAI reads both from here)."""
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["search"]["max_length"] = max(CAPACITIES)
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = THREADS
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


# ---- workers (each in its own process) --------------------------------------------------------------------------
def _prompt(seed: int, n: int, vocab: int = 32000) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.int64)


def worker_stream(path: str, steps: int, **load: Any) -> dict[str, Any]:
    """``load``: more options for ``wmdeploy.load`` (bench_lm: ``backend="openvino", precision="bf16"``)."""
    import wmdeploy

    model = wmdeploy.load(path, threads=THREADS, **load)
    model.stream().step(tokens=_prompt(1, PROMPT)[None])  # warm-up: the first run sizes ORT's memory arena
    stream = model.stream()
    t0 = time.perf_counter()
    logits = stream.step(tokens=_prompt(0, PROMPT)[None])["logits"][0, -1]
    prefill = time.perf_counter() - t0
    times, tokens = [], []
    for _ in range(steps + 8):
        token = int(np.argmax(logits))
        tokens.append(token)
        t0 = time.perf_counter()
        logits = stream.step(tokens=np.array([[token]], dtype=np.int64))["logits"][0, -1]
        times.append(time.perf_counter() - t0)
    times = times[8:]  # warm-up
    return {"ms_per_token": 1e3 * statistics.median(times), "p90_ms": 1e3 * float(np.percentile(times, 90)),
            "tokens_per_s": 1.0 / statistics.median(times), "greedy": tokens[:16],
            "prefill_tokens_per_s": PROMPT / prefill, "precision": model.describe().get("effective_precision")}


def worker_pool(path: str, steps: int, streams: int, **load: Any) -> dict[str, Any]:
    import wmdeploy

    model = wmdeploy.load(path, threads=THREADS, **load)
    pool = model.pool(capacity=streams)
    sids, last = [], {}
    for i in range(streams):  # joined one after another, prompts of different lengths: different positions
        sid = pool.join()
        out = pool.step({sid: {"tokens": _prompt(i, PROMPT + POOL_SPREAD * i)[None]}})
        last[sid] = int(np.argmax(out[sid]["logits"][0, -1]))
        sids.append(sid)
    times = []
    for _ in range(steps + 4):
        t0 = time.perf_counter()
        outs = pool.step({sid: {"tokens": np.array([[last[sid]]], dtype=np.int64)} for sid in sids})
        times.append(time.perf_counter() - t0)
        last = {sid: int(np.argmax(outs[sid]["logits"][0, -1])) for sid in sids}
    times = times[4:]
    step = statistics.median(times)
    return {"ms_per_step": 1e3 * step, "tokens_per_s": streams / step, "streams": streams,
            "positions": [PROMPT + POOL_SPREAD * i for i in range(streams)]}


def worker_genai(path: str, steps: int) -> dict[str, Any]:
    import onnxruntime_genai as og

    model = og.Model(path)  # CPU; intra_op_num_threads from genai_config.json (_genai_settings)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=max(CAPACITIES), batch_size=1)
    og.Generator(model, params).append_tokens(_prompt(1, PROMPT)[None].astype(np.int32))  # warm-up, as ours
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(_prompt(0, PROMPT)[None].astype(np.int32))  # runs the prompt (GenAI computes on append)
    prefill = time.perf_counter() - t0
    times, tokens = [], []
    for _ in range(steps + 8):
        t0 = time.perf_counter()
        gen.generate_next_token()
        times.append(time.perf_counter() - t0)
        tokens.append(int(gen.get_next_tokens()[0]))
    times = times[8:]
    # GenAI's first generate_next_token samples from the prompt's logits: its token k is our token k
    return {"ms_per_token": 1e3 * statistics.median(times), "p90_ms": 1e3 * float(np.percentile(times, 90)),
            "tokens_per_s": 1.0 / statistics.median(times), "greedy": tokens[:16], "prefill_tokens_per_s": PROMPT / prefill}


def run_worker(script: str, *args: str) -> dict[str, Any]:
    """``python SCRIPT --worker ARGS`` in a fresh process (after a pause): its last stdout line, as JSON."""
    time.sleep(2.0)  # the previous process's threads are gone; let the cores settle
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    done = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"worker {args[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def alternate(script: str, jobs: dict[str, tuple[str, ...]], rounds: int, tolerate: bool = False) -> dict[str, Any]:
    """Every job once per round, engines alternating, each in its own process; per job the run of median speed
    (with ``rounds_tokens_per_s``). ``tolerate``: a failing worker loses its row, not the others' numbers."""
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in jobs}
    for r in range(rounds):
        for key, job in jobs.items():
            try:
                runs[key].append(run_worker(script, *job))
            except RuntimeError as exc:
                if not tolerate:
                    raise
                print(f"  {key}: {str(exc).splitlines()[-1]}", flush=True)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]['tokens_per_s']:.0f} tok/s"
                                                      for k, v in runs.items() if v), flush=True)
    results: dict[str, Any] = {}
    for key, got in runs.items():
        if got:
            ordered = sorted(got, key=lambda x: x["tokens_per_s"])
            results[key] = {**ordered[len(ordered) // 2], "rounds_tokens_per_s": [x["tokens_per_s"] for x in got]}
    return results


# ---- the run ----------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "hf.json")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="each engine runs this many times, alternating")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the folder and files here (reused when present)")
    ap.add_argument("--no-genai", action="store_true", help="skip ONNX Runtime GenAI even when installed")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, path, steps, *rest = args.worker
        fn = {"stream": worker_stream, "pool": worker_pool, "genai": worker_genai}[kind]
        print(json.dumps(fn(path, int(steps), *map(int, rest))))
        return 0

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_hf_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"building the folder and files in {work}", flush=True)
    model = build_folder(work / "qwen3-100m")
    files = export_files(work / "qwen3-100m", work)
    genai_dir = None
    if not args.no_genai:
        try:
            import onnxruntime_genai  # noqa: F401

            genai_dir = build_genai(work / "qwen3-100m", work / "genai_fp32")
        except ImportError:
            print("  onnxruntime-genai is not installed: no GenAI row (pip install onnxruntime-genai)", flush=True)

    # the engines alternate, each run in a fresh process, --rounds times; per row the run of median speed
    jobs: dict[str, tuple[str, ...]] = {f"wmdeploy_1_stream_cap{cap}": ("stream", str(files[cap]), str(args.steps))
                                        for cap in CAPACITIES}
    jobs[f"wmdeploy_{args.streams}_streams_cap4096"] = ("pool", str(files[4096]), str(args.steps), str(args.streams))
    if genai_dir is not None:
        jobs["genai_1_stream_fp32"] = ("genai", str(genai_dir), str(args.steps))
    results = alternate(__file__, jobs, args.rounds)

    one256, one4096 = results["wmdeploy_1_stream_cap256"], results["wmdeploy_1_stream_cap4096"]
    pool = results[f"wmdeploy_{args.streams}_streams_cap4096"]
    ratios = {
        "cap4096_over_cap256_ms_per_token": one4096["ms_per_token"] / one256["ms_per_token"],
        f"{args.streams}_streams_over_1_stream_tokens_per_s": pool["tokens_per_s"] / one4096["tokens_per_s"],
    }
    rows = [("wmdeploy, 1 stream, --max-context 256", one256),
            ("wmdeploy, 1 stream, --max-context 4096", one4096),
            (f"wmdeploy, {args.streams} streams at different positions, 4096", pool)]
    if "genai_1_stream_fp32" in results:
        genai = results["genai_1_stream_fp32"]
        rows.append(("ONNX Runtime GenAI (its builder, fp32), 1 stream, max_length 4096", genai))
        ratios["wmdeploy_4096_over_genai_tokens_per_s"] = one4096["tokens_per_s"] / genai["tokens_per_s"]
        ratios[f"wmdeploy_{args.streams}_streams_over_genai_1_stream_tokens_per_s"] = (
            pool["tokens_per_s"] / genai["tokens_per_s"])
        ratios["greedy_tokens_equal_genai"] = one4096["greedy"] == genai["greedy"]
    ratios["greedy_tokens_equal_256_4096"] = one256["greedy"] == one4096["greedy"]
    bytes_per_token = model["weights_mb"] * 1e6

    print(f"\n{model['weights_mb']} MB of fp32 weights; context {PROMPT} -> {PROMPT + args.steps}; {THREADS} threads; "
          f"{platform.processor() or platform.machine()}")
    print(f"| {'engine':<66} | ms/step | tok/s | GB/s of weights |")
    print(f"|{'-' * 68}|---------|-------|-----------------|")
    for name, r in rows:
        ms = r.get("ms_per_token", r.get("ms_per_step"))
        print(f"| {name:<66} | {ms:7.2f} | {r['tokens_per_s']:5.0f} | {bytes_per_token / (ms / 1e3) / 1e9:15.1f} |")
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}" if isinstance(v, float) else f"  {k}: {v}")
    return write_results(args.json, {"model": model, "steps": args.steps, "rounds": args.rounds, "prompt": PROMPT,
                                     "threads": THREADS, "results": results, "ratios": ratios})


if __name__ == "__main__":
    sys.exit(main())
