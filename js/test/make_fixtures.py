"""Fixtures for the JavaScript tests, made by the Python side: model files, Python's outputs, snapshots
and Python's one-line input errors, so that every JS assertion is against what Python itself produced.

    python js/test/make_fixtures.py OUT_DIR

Writes OUT_DIR/{recall,lstm,gru}.onnx, OUT_DIR/<model>.snap (a Python snapshot taken mid-stream) and
OUT_DIR/expected.json. tests/test_js.py calls ``make(OUT_DIR)`` in process; ``npm test`` runs this file
with the repository's .venv when WMDEPLOY_FIXTURES is not set.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # tests/_rt_models: the small models the Python runtime tests use

import wmdeploy  # noqa: E402
from wmdeploy.errors import InputError  # noqa: E402

RECALL_CHECKPOINT = ROOT / "models" / "checkpoints" / "gru_attention_recall.pt"


def _tensor(arr: np.ndarray) -> dict[str, Any]:
    return {"dtype": str(arr.dtype), "dims": list(arr.shape), "data": arr.ravel().tolist()}


def _stream_case(model: Any, name: str, chunks: list[dict[str, np.ndarray]], snapshot_at: int, out: Path,
                 batch: int = 1) -> dict[str, Any]:
    """Python's outputs for every chunk, and its snapshot after the first ``snapshot_at`` chunks."""
    stream = model.stream(batch=batch)
    steps = []
    for i, feeds in enumerate(chunks):
        if i == snapshot_at:
            (out / f"{name}.snap").write_bytes(stream.snapshot())
        outputs = stream.step(**feeds)
        steps.append({"inputs": {k: _tensor(v) for k, v in feeds.items()},
                      "outputs": {k: _tensor(v) for k, v in outputs.items()}})
    return {"file": f"{name}.onnx", "batch": batch, "layout": model.spec.layout_hash(), "steps": steps,
            "snapshot_at": snapshot_at, "snapshot": f"{name}.snap", "spec": model.spec.to_dict()}


def _error(model: Any, name: str, feeds: dict[str, Any], batch: int = 1) -> dict[str, Any]:
    """Python's message for a bad step; ``feeds`` values are typed arrays (numpy) or plain lists."""
    try:
        model.stream(batch=batch).step(**feeds)
    except InputError as exc:
        message = str(exc)
    else:
        raise AssertionError(f"{name}: {feeds} was accepted")
    typed = {k: _tensor(v) if isinstance(v, np.ndarray) else {"list": v} for k, v in feeds.items()}
    return {"model": name, "batch": batch, "inputs": typed, "message": message}


def make(out: Path) -> Path:
    from _rt_models import build_gru_onnx, build_lstm_lm  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    # verify=False: the export itself is checked by the Python tests; here only the file matters
    wmdeploy.export_module("wmdeploy.models.gru_attention:GRUAttentionLM", out / "recall.onnx",
                           checkpoint=RECALL_CHECKPOINT, verify=False)
    build_lstm_lm(out / "lstm.onnx")
    build_gru_onnx(out / "gru.onnx")
    models = {name: wmdeploy.load(out / f"{name}.onnx") for name in ("recall", "lstm", "gru")}
    rng = np.random.default_rng(0)
    chars = models["recall"].spec.meta["vocab"]["chars"]
    recall_text = "aBcDeFgH?c?aiJ?e?g?i"  # stores, then queries: the answers come from the state
    recall_ids = [chars.index(c) for c in recall_text]
    cuts = [0, 3, 4, 8, 9, 12, 14, 20]
    recall_chunks = [{"tokens": np.array([recall_ids[a:b]], np.int64)} for a, b in zip(cuts, cuts[1:])]
    lstm_chunks = [{"tokens": rng.integers(0, 16, (2, t)).astype(np.int64)} for t in (3, 1, 5, 2, 4)]
    gru_chunks = [{"x": rng.normal(size=(t, 1, 3)).astype(np.float32)} for t in (2, 5, 1, 3)]
    streams = {
        "recall": _stream_case(models["recall"], "recall", recall_chunks, 3, out),
        "lstm": _stream_case(models["lstm"], "lstm", lstm_chunks, 2, out, batch=2),
        "gru": _stream_case(models["gru"], "gru", gru_chunks, 2, out),
    }
    i64, f32 = np.int64, np.float32
    errors = [
        _error(models["lstm"], "lstm", {}),
        _error(models["lstm"], "lstm", {"tokens": np.zeros((1, 2), i64), "h": np.zeros((2, 1, 8), f32)}),
        _error(models["gru"], "gru", {"x": np.zeros((1, 1, 3), f32), "scale": np.zeros((1,), f32)}),
        _error(models["lstm"], "lstm", {"tokens": np.zeros((1, 2), np.int32)}),
        _error(models["gru"], "gru", {"x": np.zeros((1, 1, 3), np.float64)}),
        _error(models["lstm"], "lstm", {"tokens": np.zeros((2,), i64)}),
        _error(models["gru"], "gru", {"x": np.zeros((2, 1, 4), f32)}),
        _error(models["lstm"], "lstm", {"tokens": np.zeros((1, 0), i64)}),
        _error(models["lstm"], "lstm", {"tokens": np.zeros((2, 3), i64)}),
        _error(models["lstm"], "lstm", {"tokens": np.zeros((1, 3), i64)}, batch=2),
        _error(models["recall"], "recall", {"tokens": np.array([[0, 33]], i64)}),
        _error(models["recall"], "recall", {"tokens": np.array([[-1, 2]], i64)}),
        _error(models["recall"], "recall", {"tokens": [[0.5, 1]]}),
    ]
    gen = wmdeploy.generate(models["recall"], "aBcDeF?c", max_tokens=1, temperature=0)
    text = gen.text()
    # text that Python's json.dumps escapes (non-ASCII, an astral character, controls, quotes): the layout hash
    # and snapshot headers are hashes of such text, so JS must write it byte for byte
    tricky = {"z": ["\u00e9t\u00e9", "\U0001f600", "tab\tquote\"back\\", "\x7f\x00"], "a": [1, -2, True, None]}
    pyjson = {"value": tricky, "sorted": json.dumps(tricky, sort_keys=True),
              "compact": json.dumps(tricky, separators=(",", ":"))}
    expected = {"streams": streams, "errors": errors, "pyjson": pyjson,
                "generate": {"model": "recall", "prompt": "aBcDeF?c", "max_tokens": 1, "tokens": gen.tokens, "text": text}}
    (out / "expected.json").write_text(json.dumps(expected))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_fixtures.py OUT_DIR")
    make(Path(sys.argv[1]))
