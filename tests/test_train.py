"""Training recipe, tasks, and the shipped recall checkpoint's working memory measured from ONNX."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wmdeploy.exporter import export
from wmdeploy.models import tasks
from wmdeploy.models.train import train
from wmdeploy.models.zoo import CHECKPOINT_DIR, load_zoo_model


def test_recall_stream_targets_are_the_last_stored_values() -> None:
    tokens, targets, distance = tasks.recall_stream(600, np.random.default_rng(3))
    assert tokens.shape == targets.shape == distance.shape == (600,)
    assert tokens.max() < tasks.RECALL_VOCAB_SIZE == len(tasks.RECALL_CHARS)
    last: dict[int, int] = {}
    queries = 0
    for i in range(1, 600):
        prev, tok = int(tokens[i - 1]), int(tokens[i])
        if targets[i] != tasks.IGNORE:
            queries += 1
            assert prev == tasks.QUERY and tok < tasks.N_KEYS
            assert targets[i] == last[tok]
            assert tokens[i - distance[i]] == targets[i]  # distance points at the stored value
        elif tok >= tasks.N_KEYS and tok < tasks.QUERY and prev < tasks.N_KEYS and tokens[i - 2] != tasks.QUERY:
            last[prev] = tok
    assert queries > 50


def test_text_corpus_is_shipped_and_small() -> None:
    data = tasks.load_corpus()
    assert 5_000 < len(data) < 200_000
    data.decode("utf-8")
    train_split, val_split = tasks.text_splits()
    assert len(train_split) + len(val_split) == len(data)
    assert (tasks.DATA_DIR / "README.md").is_file()


@pytest.fixture(scope="module")
def zoo_recall_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped GRU-attention recall checkpoint, exported and verified through the generic path."""
    path = tmp_path_factory.mktemp("zoo") / "gru_attention_recall.onnx"
    export(load_zoo_model("gru_attention"), path, chunks=(1, 7, 32), batches=(1, 3))
    return path


def test_recall_checkpoint_uses_its_working_memory_from_onnx(zoo_recall_onnx: Path) -> None:
    """Streamed 4 tokens per call with ONNX Runtime: keys stored 2-8 calls earlier are recalled far above
    chance (1/16); once a key has fallen out of the 32-position attention memory, recall drops to what the
    GRU's own hidden state still holds."""
    r = tasks.evaluate_recall_onnx(zoo_recall_onnx, streams=4, length=768, chunk=4)
    b = r["buckets"]
    assert r["chance"] == pytest.approx(1 / 16)
    for name in ("9-16", "17-24", "25-32"):  # 2..8 calls back
        assert b[name]["n"] >= 20
        assert b[name]["accuracy"] > 0.8, (name, b)
    assert b["49+"]["accuracy"] < b["25-32"]["accuracy"] - 0.3, b  # beyond the window: mostly forgotten


def test_recall_metrics_are_recorded_next_to_the_checkpoint() -> None:
    m = json.loads((CHECKPOINT_DIR / "metrics.json").read_text())["gru_attention_recall.pt"]
    assert m["task"] == "recall"
    assert m["recall_onnx"]["buckets"]["17-24"]["accuracy"] > 0.8


@pytest.mark.parametrize("task", ["recall", "text"])
def test_train_writes_a_loadable_checkpoint(task: str, tmp_path: Path) -> None:
    name = "gru_attention" if task == "recall" else "lstm_lm"
    cfg = {"hidden_size": 16, "embed_dim": 8} | ({"memory": 8} if task == "recall" else {})
    out = tmp_path / "ck.pt"
    _, metrics = train(name, task, 3, out, batch=4, length=32, config=cfg, log_every=0, threads=1,
                       onnx_eval=False)
    data = torch.load(str(out), map_location="cpu", weights_only=True)
    assert data["config"]["hidden_size"] == 16 and data["metrics"]["steps"] == 3
    assert json.loads((tmp_path / "metrics.json").read_text())["ck.pt"]["task"] == task
    key = "recall_accuracy_torch" if task == "recall" else "val_bits_per_byte"
    assert key in metrics
