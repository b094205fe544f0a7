"""The exported file checked against transformers itself: streamed logits and greedy tokens.

Three sequences are streamed through the file three ways — each alone in a ``Stream`` (prefill chunks of
different lengths, then single tokens), and together in one ``StreamPool`` where they joined at different
times, so most engine calls carry rows at different positions — and every logit is compared with the
model's own full forward over the whole sequence. Then greedy decoding from the file is compared token for
token with ``model.generate(do_sample=False)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: (prefill chunk lengths) per sequence when streamed alone; the rest of each sequence goes one token a step
ALONE_CHUNKS = ((7,), (3, 4), (1,))
#: tokens each sequence holds before the pool's shared steps begin (they joined at different times); then one
#: two-token step of all three together, then single tokens
POOL_HEADSTART = (5, 2, 0)


@dataclass
class HFCheckReport:
    family: str
    length: int
    max_diff_alone: float = 0.0
    max_diff_pool: float = 0.0
    max_abs_reference: float = 0.0
    greedy_reference: list[int] = field(default_factory=list)
    greedy_file: list[int] = field(default_factory=list)
    atol: float = 2e-3

    @property
    def greedy_equal(self) -> bool:
        return self.greedy_reference == self.greedy_file

    @property
    def ok(self) -> bool:
        return self.max_diff_alone <= self.atol and self.max_diff_pool <= self.atol and self.greedy_equal

    def summary(self) -> str:
        greedy = ("greedy tokens equal" if self.greedy_equal else
                  f"greedy tokens differ: transformers {self.greedy_reference}, file {self.greedy_file}")
        return (f"{self.family}: streamed logits vs transformers' full forward: max |diff| {self.max_diff_alone:.2e} "
                f"alone, {self.max_diff_pool:.2e} in a pool of 3 at different positions (bound {self.atol:g}, "
                f"|logits| up to {self.max_abs_reference:.2f}); {greedy} ({len(self.greedy_file)} tokens)")

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "length": self.length, "max_diff_alone": self.max_diff_alone,
                "max_diff_pool": self.max_diff_pool, "max_abs_reference": self.max_abs_reference,
                "greedy_reference": self.greedy_reference, "greedy_file": self.greedy_file,
                "greedy_equal": self.greedy_equal, "atol": self.atol, "ok": self.ok}


def _tokens(a: np.ndarray) -> dict[str, np.ndarray]:
    return {"tokens": np.ascontiguousarray(a, dtype=np.int64)}


def _stream_alone(model: Any, seq: np.ndarray, chunks: tuple[int, ...]) -> np.ndarray:
    stream = model.stream()
    out, pos = [], 0
    for n in list(chunks) + [1] * (len(seq) - sum(chunks)):
        out.append(stream.step(**_tokens(seq[None, pos:pos + n]))["logits"][0])
        pos += n
    return np.concatenate(out, axis=0)


def _stream_pool(model: Any, ids: np.ndarray) -> list[np.ndarray]:
    pool = model.pool()
    sids = [pool.join() for _ in ids]
    got: list[list[np.ndarray]] = [[] for _ in ids]
    pos = [0] * len(ids)
    for i, head in enumerate(POOL_HEADSTART[: len(ids)]):
        if head:
            got[i].append(pool.step({sids[i]: _tokens(ids[i, None, :head])})[sids[i]]["logits"][0])
            pos[i] = head
    length = ids.shape[1]
    # one shared two-token step: rows with and without a past in one pool step (GQA files split it)
    outs = pool.step({sids[i]: _tokens(ids[i, None, pos[i]:pos[i] + 2]) for i in range(len(ids))})
    for i in range(len(ids)):
        got[i].append(outs[sids[i]]["logits"][0])
        pos[i] += 2
    while any(p < length for p in pos):
        live = [i for i in range(len(ids)) if pos[i] < length]
        outs = pool.step({sids[i]: _tokens(ids[i, None, pos[i]:pos[i] + 1]) for i in live})
        for i in live:
            got[i].append(outs[sids[i]]["logits"][0])
            pos[i] += 1
    return [np.concatenate(g, axis=0) for g in got]


def _reference_generate(hf_model: Any, prompt: np.ndarray, n: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.from_numpy(prompt[None]), do_sample=False, max_new_tokens=n, min_new_tokens=0,
                                eos_token_id=None, pad_token_id=0, use_cache=True)
    return [int(t) for t in out[0, len(prompt):]]


def _file_generate(model: Any, prompt: np.ndarray, n: int) -> list[int]:
    stream = model.stream()
    logits = stream.step(**_tokens(prompt[None]))["logits"][0, -1]
    tokens: list[int] = []
    for _ in range(n):
        token = int(np.argmax(logits))
        tokens.append(token)
        logits = stream.step(**_tokens(np.array([[token]])))["logits"][0, -1]
    return tokens


def check_file(path: str | Path, hf_model: Any, family: str, *, vocab_size: int, length: int = 12,
               greedy_tokens: int = 8, atol: float = 2e-3, seed: int = 0, backend: str = "onnxruntime") -> HFCheckReport:
    """Compare the exported file with ``hf_model`` (eager attention, float32); see the module doc."""
    from ..streaming import load  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, (len(ALONE_CHUNKS), length))
    with torch.no_grad():
        ref = hf_model(input_ids=torch.from_numpy(ids)).logits.float().numpy()
    report = HFCheckReport(family, length, atol=atol, max_abs_reference=float(np.abs(ref).max()))
    model = load(path, backend=backend)
    try:
        for i, chunks in enumerate(ALONE_CHUNKS):
            got = _stream_alone(model, ids[i], chunks)
            report.max_diff_alone = max(report.max_diff_alone, float(np.abs(got - ref[i]).max()))
        for i, got in enumerate(_stream_pool(model, ids)):
            report.max_diff_pool = max(report.max_diff_pool, float(np.abs(got - ref[i]).max()))
        prompt = ids[0, :5]
        report.greedy_reference = _reference_generate(hf_model, prompt, greedy_tokens)
        report.greedy_file = _file_generate(model, prompt, greedy_tokens)
    finally:
        model.close()
    return report
