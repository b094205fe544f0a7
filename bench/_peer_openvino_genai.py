"""OpenVINO GenAI peer for bench_lm.py: ``LLMPipeline`` (batch 1) and ``ContinuousBatchingPipeline`` (N streams).

    python bench/_peer_openvino_genai.py FOLDER OUTDIR [--steps 48] [--streams 16] [--prop KEY=VALUE ...]

Route: GenAI's own GGUF reader (2025.2+; Qwen3 is one of its architectures), fed the GGUF files that
_peer_llamacpp.py builds, so both peers run the very same weights: ``int4`` is llama.cpp's Q4_0 (symmetric int4,
group 32, which GenAI keeps as u4 weights + f16 scales; the tied embedding / LM head Q6_K) and ``fp32`` is the
F16 GGUF, because the reader refuses F32 tensors ("Unsupported quantization type"). That changes little for
the fp32 row on a CPU with bf16: the plugin's default inference precision is then bf16, and its bf16
FullyConnected would repack f32 weights to bf16 too. (optimum-intel, the usual IR exporter, would downgrade our
torch and transformers; NNCF on an IR is the other int4 route, not taken: it quantizes differently from
llama.cpp.) With ``INFERENCE_PRECISION_HINT=f32 KV_CACHE_PRECISION=f32`` both files give exactly the greedy
tokens of transformers on the same (f16-rounded / Q4_0-dequantized) weights. The tokenizer GenAI builds from
the GGUF is never used: the workers feed token ids.

Defaults are what a user gets, except 2 inference threads: bf16 activations on CPUs with AVX512-BF16 or AMX
(else f32), the plugin's KV-cache precision (u8 on x86), and for ``LLMPipeline`` GenAI's default attention
backend, "PA" (it runs the model through its continuous-batching engine); ``ATTENTION_BACKEND=SDPA`` selects
the stateful pipeline. Every result says which (``precision``, ``attention_backend``).
Bench only: never a dependency of wmdeploy (bench/requirements-peers.txt).
"""
from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peer_llamacpp  # noqa: E402  (the GGUF files)
from bench_hf import POOL_SPREAD, PROMPT, THREADS, _prompt  # noqa: E402

GGUF_KIND = {"fp32": "f16", "int4": "q4_0"}


def build(folder: Path, out: Path, precision: str) -> Path | None:
    """The GGUF that GenAI loads directly: F16 for fp32, llama.cpp's Q4_0 for int4 (see the module's docstring)."""
    if importlib.util.find_spec("openvino_genai") is None:
        print("  OpenVINO GenAI: openvino-genai is not installed (bench/requirements-peers.txt)", flush=True)
        return None
    return _peer_llamacpp.gguf(Path(folder), Path(out), GGUF_KIND[precision])  # None (and why) without llama.cpp


# ---- workers (each in its own process) --------------------------------------------------------------------------
def _properties(extra: dict[str, Any]) -> dict[str, Any]:
    return {"INFERENCE_NUM_THREADS": THREADS, **extra}


def _precision(path: str, props: dict[str, Any]) -> str:
    """Weights of the file; activations and KV cache as the CPU plugin defaults them (unless overridden)."""
    import openvino as ov

    core = ov.Core()
    hint = props.get("INFERENCE_PRECISION_HINT", core.get_property("CPU", "INFERENCE_PRECISION_HINT"))
    kv = props.get("KV_CACHE_PRECISION", core.get_property("CPU", "KV_CACHE_PRECISION"))
    weights = Path(path).stem.rsplit("-", 1)[-1].upper()
    return f"{weights} weights, {_type_name(hint)} activations, {_type_name(kv)} KV cache"


def _type_name(t: Any) -> str:
    return t.to_string() if hasattr(t, "to_string") else str(t)  # ov.Type.bf16 -> "bf16"; a user's string as is


def _ids(seed: int, n: int) -> Any:
    import openvino as ov

    return ov.Tensor(np.ascontiguousarray(_prompt(seed, n)[None]))  # int64 [1, n]: GenAI's input_ids


def worker_stream(path: str, steps: int, **properties: Any) -> dict[str, Any]:
    """Batch-1 greedy with ``LLMPipeline.generate`` on the 64 prompt ids (an ov.Tensor: no tokenizer involved).

    GenAI only offers a whole-generate call, so the per-token times are its own perf metrics:
    ``raw_metrics.m_new_token_times`` (one steady-clock stamp in ms per new token, taken in the pipeline's loop;
    a perf_counter streamer, which GenAI calls from its own thread, saw the same median within 0.2 ms but more
    jitter). Interval k is decode step k (sampling included); the first 8 dropped. Prefill: its TTFT (the 64-token
    prompt + the first token's sampling, in the process's first inference, like the other workers' prefill)."""
    import openvino_genai as ov_genai

    props = _properties(properties)
    pipe = ov_genai.LLMPipeline(path, "CPU", **props)
    config = ov_genai.GenerationConfig()
    config.max_new_tokens, config.ignore_eos, config.do_sample = steps + 9, True, False  # 1 from prefill + steps + 8
    result = pipe.generate(_ids(0, PROMPT), config)
    metrics = result.perf_metrics
    stamps = np.asarray(metrics.raw_metrics.m_new_token_times, dtype=np.float64) / 1e3  # ms -> s
    times = list(np.diff(stamps))[8:]  # warm-up
    if len(times) != steps:
        raise RuntimeError(f"expected {steps + 9} token stamps, got {len(stamps)}")
    step = statistics.median(times)
    return {"ms_per_token": 1e3 * step, "p90_ms": 1e3 * float(np.percentile(times, 90)), "tokens_per_s": 1.0 / step,
            "greedy": [int(t) for t in result.tokens[0][:16]],
            "prefill_tokens_per_s": PROMPT / (metrics.get_ttft().mean / 1e3),
            "tpot_ms": metrics.get_tpot().mean,  # GenAI's own mean over all steps (no warm-up dropped)
            "precision": _precision(path, props), "attention_backend": props.get("ATTENTION_BACKEND", "PA (default)")}


def worker_pool(path: str, steps: int, streams: int, **properties: Any) -> dict[str, Any]:
    """``streams`` requests (stream i: 64 + 8 i prompt ids from seed i) in a ``ContinuousBatchingPipeline`` with
    its default scheduler (dynamic split-fuse, 256 batched tokens, cache grown as needed), driven step by step
    with ``add_request`` / ``step()`` rather than one ``generate`` over the list: the scheduler mixes prompt
    chunks into decode steps, and stepping by hand lets prefill finish first (every stream holds its first token)
    before ``steps + 4`` timed ``step()`` calls, each one token for every stream (checked); the first 4 dropped.
    Each step is scheduling + one batched inference + sampling, all in GenAI's C++; prefill is not in tokens/s."""
    import openvino_genai as ov_genai

    props = _properties({k: v for k, v in properties.items() if k != "ATTENTION_BACKEND"})  # PA, always
    scheduler = ov_genai.SchedulerConfig()
    scheduler.max_num_seqs = max(scheduler.max_num_seqs, streams)
    # a KV cache allocated up front for every stream's whole run (~8 KB a token here): grown on demand, 64 streams
    # at positions up to ~620 ran out of blocks and the scheduler preempted some mid-run (steps without their token)
    scheduler.cache_size = max(scheduler.cache_size, 1)  # GB
    pipe = ov_genai.ContinuousBatchingPipeline(path, scheduler, "CPU", props)
    config = ov_genai.GenerationConfig()
    # none may end before the timed steps: streams admitted first decode while later prompts are prefilled (64
    # streams: ~80 steps of prompt chunks), so they hold more than their prompt when timing starts; stopped after
    config.max_new_tokens, config.ignore_eos, config.do_sample = 1024, True, False
    handles = [pipe.add_request(i, _ids(i, PROMPT + POOL_SPREAD * i), config) for i in range(streams)]
    counts = [0] * streams

    def new_tokens() -> list[int]:
        fresh = [sum(len(o.generated_ids) for o in h.read().values()) if h.can_read() else 0 for h in handles]
        for i, n in enumerate(fresh):
            counts[i] += n
        return fresh

    while min(counts) == 0:  # prefill (and, for early streams, their first decode steps)
        pipe.step()
        new_tokens()
    times = []
    for _ in range(steps + 4):
        t0 = time.perf_counter()
        pipe.step()
        times.append(time.perf_counter() - t0)
        if new_tokens() != [1] * streams:
            raise RuntimeError("a timed step did not give exactly one token per stream")
    for h in handles:  # let the pipeline release its blocks before it goes (else it logs leaks at exit)
        h.stop()
    while pipe.has_non_finished_requests():
        pipe.step()
    times = times[4:]
    step = statistics.median(times)
    return {"ms_per_step": 1e3 * step, "tokens_per_s": streams / step, "streams": streams,
            "positions": [PROMPT + POOL_SPREAD * i for i in range(streams)], "precision": _precision(path, props),
            "generated_before_timing": [c - steps - 4 for c in counts]}


if __name__ == "__main__":
    _peer_llamacpp.standalone("openvino_genai", __doc__, build, worker_stream, worker_pool, props=True)
