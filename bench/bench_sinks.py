"""What a bounded working memory costs in quality: StreamingLLM sinks against a plain sliding window and the full
context, on a small LM this bench trains itself on the shipped corpus.

    python bench/bench_sinks.py [--capacity 64] [--sinks 4] [--steps 600] [--json bench/results/sinks.json]

The LM: Qwen3-shaped (2 layers x 128, 4 query / 2 KV heads of 32, MLP 256), the tests' 320-token BPE tokenizer,
trained ``--steps`` AdamW steps on 64-token windows of the corpus' training split (so it never saw a position
past 63). Then ``export hf:`` at ``--max-context C`` twice: ``--overflow sinks:K`` and ``sinks:0`` (a plain
sliding window: the most recent C tokens, positions within the cache), and streams of 4 x C tokens of the
held-out split are fed token by token through each file; the full context is transformers' own forward over the
whole stream (absolute positions up to 4C - 1). Reported: cross-entropy per token (nats) over the positions
below C (all three must agree there) and past C, the part StreamingLLM is about.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from _timing import write_results  # noqa: E402

LM = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 4096}
WINDOW = 64  # training window: no position past it is ever seen


def train(path: Path, steps: int) -> tuple[np.ndarray, float]:
    """The trained folder (tests/_hf_folders.train_corpus_lm) and the held-out split in its tokens."""
    from _hf_folders import build_tokenizer, corpus_ids, train_corpus_lm

    t0 = time.perf_counter()
    train_corpus_lm(path, steps, WINDOW, **LM)
    return corpus_ids(build_tokenizer())[1], time.perf_counter() - t0


def _ce(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    return np.log(np.exp(z).sum(-1)) - z[np.arange(len(targets)), targets]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--capacity", type=int, default=64)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--streams", type=int, default=3)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "sinks.json")
    args = ap.parse_args()
    import torch
    import transformers

    import wmdeploy

    work = Path(tempfile.mkdtemp(prefix="bench_sinks_"))
    held, train_s = train(work / "lm", args.steps)
    cap, length = args.capacity, 4 * args.capacity
    files = {f"sinks:{args.sinks}": wmdeploy.export_hf(work / "lm", work / "sinks.onnx", max_context=cap,
                                                      overflow=f"sinks:{args.sinks}").path,
             "sliding (sinks:0)": wmdeploy.export_hf(work / "lm", work / "sliding.onnx", max_context=cap,
                                                      overflow="sinks:0").path}
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(work / "lm"), dtype=torch.float32).eval()
    if len(held) < length + 1:
        raise SystemExit(f"the held-out split has {len(held)} tokens; need {length + 1}")
    starts = np.linspace(0, len(held) - length - 1, args.streams).astype(int)
    ce: dict[str, list[np.ndarray]] = {name: [] for name in [*files, "full context (transformers)"]}
    for s0 in starts:
        ids, targets = held[s0:s0 + length], held[s0 + 1:s0 + length + 1]
        for name, path in files.items():
            stream = wmdeploy.load(path).stream()
            logits = np.concatenate([stream.step(tokens=ids[None, i:i + 1])["logits"][0] for i in range(length)])
            ce[name].append(_ce(logits, targets))
        with torch.no_grad():
            full = hf(input_ids=torch.from_numpy(ids[None])).logits[0].numpy()
        ce["full context (transformers)"].append(_ce(full, targets))
    rows = {name: {"below_capacity": float(np.mean([c[:cap] for c in v])),
                   "past_capacity": float(np.mean([c[cap:] for c in v])),
                   "last_quarter": float(np.mean([c[3 * cap:] for c in v]))} for name, v in ce.items()}
    print(f"\nLM trained {args.steps} steps on {WINDOW}-token windows ({train_s:.0f} s); capacity {cap}, streams of "
          f"{length} held-out tokens x {args.streams}; cross-entropy, nats per token (uniform: {np.log(320):.2f})")
    print("| memory | positions 0..C-1 | positions C..4C-1 | last quarter |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['below_capacity']:.3f} | {r['past_capacity']:.3f} | {r['last_quarter']:.3f} |")
    return write_results(args.json, {"capacity": cap, "sinks": args.sinks, "train_steps": args.steps,
                                     "train_s": train_s, "stream_length": length, "streams": args.streams,
                                     "cross_entropy": rows})


if __name__ == "__main__":
    sys.exit(main())
