"""Training and evaluation tasks for the zoo: associative recall (working memory) and character text.

Associative recall
------------------
A stream of tokens over a 33-symbol vocabulary, shown as characters: keys ``a``-``p`` (ids 0-15),
values ``A``-``P`` (16-31) and the query mark ``?`` (32). Events follow one another without a break:

* store ``k V``: key k now holds value V (a fresh random value each time);
* query ``? k V``: the model must predict V, the value last stored under k, at the position of k.

Keys are stored in rounds (a random permutation of the 16 keys per round), so a key's previous store is
roughly one round (~55 tokens) back; queries pick uniformly among the keys stored so far, so the
distance from the store to the query spreads from a few tokens to about a round. A model with a
working memory of K positions can answer queries up to about K tokens back and is at chance (1/16)
beyond: the distance buckets of ``evaluate_recall_onnx`` show both. Streamed in calls of a few tokens,
"K tokens back" is "many calls back": the memory crosses calls through the state.

Text
----
``data/corpus.txt`` (see ``data/README.md``), read as bytes; the last 10% is the validation split.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

N_KEYS = 16
N_VALUES = 16
QUERY = N_KEYS + N_VALUES
RECALL_VOCAB_SIZE = QUERY + 1
RECALL_CHARS = "abcdefghijklmnop" "ABCDEFGHIJKLMNOP" "?"
RECALL_VOCAB = {"kind": "chars", "chars": RECALL_CHARS}
IGNORE = -100

#: distance buckets (in tokens from the stored value to the query key), inclusive bounds
DISTANCE_BUCKETS: tuple[tuple[int, int], ...] = ((1, 8), (9, 16), (17, 24), (25, 32), (33, 40), (41, 48),
                                                  (49, 10**9))

DATA_DIR = Path(__file__).resolve().parent / "data"
CORPUS_PATH = DATA_DIR / "corpus.txt"


def recall_stream(length: int, rng: np.random.Generator, p_query: float = 0.35) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One recall stream: ``tokens`` [length] int64, ``targets`` (the value to predict at each query key,
    IGNORE elsewhere) and ``distance`` (tokens back to the stored value at query keys, -1 elsewhere)."""
    tokens: list[int] = []
    targets: list[int] = []
    distance: list[int] = []
    last_value: dict[int, tuple[int, int]] = {}  # key -> (value id, position of the value token)
    order: list[int] = []
    while len(tokens) < length:
        if last_value and rng.random() < p_query:
            key = int(rng.choice(sorted(last_value)))
            value, at = last_value[key]
            pos = len(tokens) + 1  # position of the key in "? k V"
            tokens += [QUERY, key, value]
            targets += [IGNORE, value, IGNORE]
            distance += [-1, pos - at, -1]
        else:
            if not order:
                order = list(rng.permutation(N_KEYS))
            key = int(order.pop())
            value = N_KEYS + int(rng.integers(N_VALUES))
            last_value[key] = (value, len(tokens) + 1)
            tokens += [key, value]
            targets += [IGNORE, IGNORE]
            distance += [-1, -1]
    return (np.asarray(tokens[:length], np.int64), np.asarray(targets[:length], np.int64),
            np.asarray(distance[:length], np.int64))


def recall_batch(batch: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = [recall_stream(length, rng) for _ in range(batch)]
    return tuple(np.stack([r[i] for r in rows]) for i in range(3))  # type: ignore[return-value]


def bucket_name(lo: int, hi: int) -> str:
    return f"{lo}+" if hi >= 10**9 else f"{lo}-{hi}"


def recall_accuracy(pred: np.ndarray, targets: np.ndarray, distance: np.ndarray, chunk: int = 1) -> dict[str, Any]:
    """Accuracy at query keys, overall and per distance bucket (tokens back; with calls back for ``chunk``)."""
    at = targets != IGNORE
    correct = (pred[at] == targets[at])
    dist = distance[at]
    out: dict[str, Any] = {"accuracy": float(correct.mean()) if correct.size else math.nan,
                           "queries": int(correct.size), "chance": 1.0 / N_VALUES, "buckets": {}}
    for lo, hi in DISTANCE_BUCKETS:
        sel = (dist >= lo) & (dist <= hi)
        if sel.any():
            out["buckets"][bucket_name(lo, hi)] = {"accuracy": float(correct[sel].mean()), "n": int(sel.sum()),
                                                   "calls_back": f"~{lo // chunk}-{min(hi, 10**6) // chunk}"
                                                   if hi < 10**9 else f">={lo // chunk}"}
    return out


def evaluate_recall_onnx(path: str | Path, *, streams: int = 8, length: int = 1024, chunk: int = 4,
                         seed: int = 1234) -> dict[str, Any]:
    """Stream recall episodes through the exported ONNX file with ONNX Runtime, ``chunk`` tokens per
    call, carrying the state between calls as the spec says; report recall accuracy by distance.

    Uses only numpy + onnxruntime + the spec in the file's metadata (no torch).
    """
    import onnxruntime as ort  # noqa: PLC0415

    from wmdeploy.contract import read_spec  # noqa: PLC0415

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    spec = read_spec(sess)
    tokens_in = spec.meta.get("tokens_input", "tokens")
    logits_out = spec.meta.get("logits_output", "logits")
    tokens, targets, distance = recall_batch(streams, length, np.random.default_rng(seed))
    states = spec.initial_states(streams)
    out_names = [logits_out] + [s.output for s in spec.states]
    preds = []
    for a in range(0, length, chunk):
        feeds = {tokens_in: tokens[:, a:a + chunk], **states}
        logits, *nxt = sess.run(out_names, feeds)
        states = {s.name: v for s, v in zip(spec.states, nxt)}
        preds.append(logits.argmax(-1))
    pred = np.concatenate(preds, axis=1)
    result = recall_accuracy(pred, targets, distance, chunk)
    result.update({"streams": streams, "length": length, "chunk": chunk, "memory": spec.meta.get("memory")})
    return result


def load_corpus() -> bytes:
    return CORPUS_PATH.read_bytes()


def text_splits(val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    data = np.frombuffer(load_corpus(), dtype=np.uint8).astype(np.int64)
    cut = int(len(data) * (1 - val_fraction))
    return data[:cut], data[cut:]


def text_batch(data: np.ndarray, batch: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random windows: inputs [B, length] and next-byte targets [B, length]."""
    starts = rng.integers(0, len(data) - length - 1, size=batch)
    idx = starts[:, None] + np.arange(length + 1)[None, :]
    windows = data[idx]
    return windows[:, :-1], windows[:, 1:]
