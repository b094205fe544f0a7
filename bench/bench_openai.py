"""The OpenAI routes of `wmdeploy serve` against the engine's own pool ceiling, and what prompt caching saves.

    python bench/bench_openai.py [--streams 32] [--max-tokens 48] [--turns 8] [--json bench/results/openai.json]
    (also run by ``python bench/bench_serve.py --openai``)

Model: a Qwen3-shaped random-init folder built here (4 layers x hidden 512, 8 query / 4 KV heads of 64, MLP 1536,
the tests' 320-token BPE tokenizer with a ChatML template), ``export hf:`` at ``--max-context 1024``.

* **ceiling**: a ``StreamPool`` of ``--streams`` streams, each prefilled with its own chat prompt, then single-token
  steps of all of them together (in its own process, before any server starts): tokens/s = streams / step;
* **N concurrent chat streams**: the official ``openai`` client (``AsyncOpenAI``, one asyncio loop) sends
  ``--streams`` streamed chat completions at once (greedy, ``max_tokens``); time to first token (p50/p90) and
  aggregate decode tokens/s (completion tokens after each stream's first / the time from the first token to
  the last) against the ceiling, and the server's mean sessions per engine step (``/metrics``);
* **multi-turn**: one conversation of ``--turns`` turns (each a new ~30-token user message), against a server
  with the prompt cache and one with ``--prompt-cache-mb 0``, each after a warm-up conversation of other text
  (so no turn pays a first-shape cost the other server has already paid): per turn the prompt tokens, the
  tokens actually prefilled (prompt - ``cached_tokens``) and the time to first token.

The client shares the 2 cores with the server: the client's own cost is in every number (as for any user on
one box). Servers run one after the other, each in its own process.
"""
from __future__ import annotations

import argparse
import asyncio
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _serve_proc import Server, metric  # noqa: E402
from _timing import write_results  # noqa: E402

MAX_CONTEXT = 1024
FOLLOW_UPS = ["Tell me more about the working memory of a language model and its cache, please.",
              "Streams at different positions step together in one call: why does that help?",
              "hello world, hello streaming runtime! café, naïve, 東京 and emoji 🙂",
              "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation: ; , . ? ( ) [ ] { }"]


def build(work: Path) -> Path:
    import transformers

    sys.path.insert(0, str(ROOT))
    from tests._hf_folders import save_folder

    import wmdeploy

    path = work / "qwen3_openai.onnx"
    if not path.is_file():
        config = transformers.Qwen3Config(vocab_size=320, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                          num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                                          max_position_embeddings=4096)
        folder = save_folder(config, work / "qwen3_openai")
        wmdeploy.export_hf(folder, path, max_context=MAX_CONTEXT, verify=False)
    return path


def _prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Question {i}: {FOLLOW_UPS[i % len(FOLLOW_UPS)]}"}]


def ceiling(path: Path, streams: int, steps: int = 24) -> dict[str, Any]:
    """Run in a child process (``--worker ceiling``): the pool's own decode rate at this many streams."""
    import wmdeploy
    from wmdeploy.generation import language_model_info

    model = wmdeploy.load(path)
    tok = language_model_info(model.spec, str(path), model).tokenizer
    pool = model.pool(capacity=streams)
    sids = []
    for i in range(streams):
        sid = pool.join()
        ids = tok.encode(tok.chat_template.render(_prompt(i)), add_special_tokens=False)
        pool.step({sid: {"tokens": np.array([ids], np.int64)}})
        sids.append(sid)
    token = {"tokens": np.array([[5]], np.int64)}
    times = []
    for _ in range(steps + 4):
        t0 = time.perf_counter()
        pool.step({sid: token for sid in sids})
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[4:])
    return {"step_ms": step * 1e3, "tokens_per_s": streams / step}


async def concurrent_streams(url: str, streams: int, max_tokens: int) -> dict[str, Any]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=300)

    async def one(i: int) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        first = last = None
        tokens = 0
        stream = await client.chat.completions.create(model="lm", messages=_prompt(i), temperature=0,
                                                      max_tokens=max_tokens, stream=True,
                                                      stream_options={"include_usage": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].delta.content:
                first = first if first is not None else now
                last = now
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return (first or now) - t0, (last or now) - t0, tokens

    # warm-up: the same load with other prompts (a server runs warm: every batch size and prompt length has
    # had its first, set-up-laden engine call; the same prompts would be prompt-cache hits)
    await asyncio.gather(*(one(10_000 + i) for i in range(streams)))
    t0 = time.perf_counter()
    got = await asyncio.gather(*(one(i) for i in range(streams)))
    wall = time.perf_counter() - t0
    ttft = [g[0] for g in got]
    decoded = sum(max(0, g[2] - 1) for g in got)
    window = max(g[1] for g in got) - min(g[0] for g in got)
    await client.close()
    return {"ttft_p50_ms": 1e3 * statistics.median(ttft), "ttft_p90_ms": 1e3 * float(np.percentile(ttft, 90)),
            "completion_tokens": sum(g[2] for g in got), "wall_s": wall,
            "decode_tokens_per_s": decoded / window if window > 0 else float("nan"),
            "aggregate_tokens_per_s": sum(g[2] for g in got) / wall}


async def multi_turn(url: str, turns: int, opener: str = "") -> list[dict[str, Any]]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=300)
    messages: list[dict[str, str]] = []
    rows = []
    for turn in range(turns):
        messages.append({"role": "user", "content": opener + FOLLOW_UPS[turn % len(FOLLOW_UPS)]})
        t0 = time.perf_counter()
        first = None
        pieces, usage = [], None
        stream = await client.chat.completions.create(model="lm", messages=messages, temperature=0, max_tokens=16,
                                                      stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        messages.append({"role": "assistant", "content": "".join(pieces)})
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        rows.append({"turn": turn + 1, "prompt_tokens": usage.prompt_tokens, "cached_tokens": cached,
                     "prefilled": usage.prompt_tokens - cached,
                     "ttft_ms": 1e3 * ((first or time.perf_counter()) - t0)})
    await client.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "openai.json")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(ceiling(Path(args.worker[1]), int(args.worker[2]))))
        return 0
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_openai_"))
    work.mkdir(parents=True, exist_ok=True)
    path = build(work)
    done = subprocess.run([sys.executable, __file__, "--worker", "ceiling", str(path), str(args.streams)],
                          capture_output=True, text=True, check=True)
    ceil = json.loads(done.stdout.strip().splitlines()[-1])
    time.sleep(2.0)  # the ceiling process's threads are gone before the server starts

    srv = Server(path, "--max-sessions", str(args.streams + 8), "--max-batch", str(args.streams + 8))
    try:
        before = srv.metrics()
        conc = asyncio.run(concurrent_streams(srv.url, args.streams, args.max_tokens))
        after = srv.metrics()
        conc["mean_sessions_per_step"] = (
            (metric(after, "wmdeploy_batch_size_sum") - metric(before, "wmdeploy_batch_size_sum"))
            / max(1.0, metric(after, "wmdeploy_batch_size_count") - metric(before, "wmdeploy_batch_size_count")))
        asyncio.run(multi_turn(srv.url, args.turns, "Another conversation. "))  # warm-up: every shape seen once
        cached_turns = asyncio.run(multi_turn(srv.url, args.turns))
    finally:
        srv.stop()
    time.sleep(2.0)
    srv = Server(path, "--prompt-cache-mb", "0")
    try:
        asyncio.run(multi_turn(srv.url, args.turns, "Another conversation. "))
        cold_turns = asyncio.run(multi_turn(srv.url, args.turns))
    finally:
        srv.stop()

    ratio = conc["decode_tokens_per_s"] / ceil["tokens_per_s"]
    print(f"\n{args.streams} concurrent streamed chat completions (openai.AsyncOpenAI), max_tokens {args.max_tokens}, "
          f"greedy; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print("| row | TTFT p50 ms | TTFT p90 ms | decode tok/s | of the ceiling | sessions / engine step |")
    print("|---|---|---|---|---|---|")
    print(f"| engine ceiling (pool of {args.streams}, one step each) | | | {ceil['tokens_per_s']:.0f} | 1.00 | "
          f"{args.streams} |")
    print(f"| OpenAI API, {args.streams} streams | {conc['ttft_p50_ms']:.0f} | {conc['ttft_p90_ms']:.0f} | "
          f"{conc['decode_tokens_per_s']:.0f} | {ratio:.2f} | {conc['mean_sessions_per_step']:.1f} |")
    print(f"\nOne conversation of {args.turns} turns (max_tokens 16 each):")
    print("| turn | prompt tokens | prefilled with cache | TTFT ms with cache | prefilled without | TTFT ms without |")
    print("|---|---|---|---|---|---|")
    for hot, cold in zip(cached_turns, cold_turns):
        print(f"| {hot['turn']} | {hot['prompt_tokens']} | {hot['prefilled']} | {hot['ttft_ms']:.1f} | "
              f"{cold['prefilled']} | {cold['ttft_ms']:.1f} |")
    saved = 1 - sum(r["prefilled"] for r in cached_turns) / max(1, sum(r["prefilled"] for r in cold_turns))
    print(f"prefill tokens saved over {args.turns} turns: {saved:.0%}; TTFT of the last turn "
          f"{cold_turns[-1]['ttft_ms'] / max(1e-9, cached_turns[-1]['ttft_ms']):.1f}x faster with the cache")
    out = {"ceiling": ceil, "concurrent": conc, "decode_over_ceiling": ratio, "turns_cached": cached_turns,
           "turns_uncached": cold_turns, "prefill_saved": saved, "streams": args.streams,
           "max_tokens": args.max_tokens}
    return write_results(args.json, out)


if __name__ == "__main__":
    sys.exit(main())
