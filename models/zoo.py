"""The model zoo: every working-memory architecture with a default config and, for some, a trained
checkpoint shipped in ``checkpoints/`` (trained by ``wmdeploy.models.train``; see ``README.md``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


@dataclass(frozen=True)
class ZooEntry:
    target: str  # "wmdeploy.models.module:Class" (a class or a factory)
    config: dict[str, Any]
    checkpoint: str | None  # file name in CHECKPOINT_DIR
    description: str
    task: str | None = None  # what the checkpoint was trained on: "recall", "text" or None
    tags: tuple[str, ...] = field(default_factory=tuple)

    def factory(self) -> Any:
        module, _, attr = self.target.partition(":")
        return getattr(import_module(module), attr)

    @property
    def checkpoint_path(self) -> Path | None:
        return CHECKPOINT_DIR / self.checkpoint if self.checkpoint else None


_RECALL = {"vocab_size": 33, "vocab": {"kind": "chars", "chars": "abcdefghijklmnopABCDEFGHIJKLMNOP?"}}

ZOO: dict[str, ZooEntry] = {
    "gru_attention": ZooEntry(
        "wmdeploy.models.gru_attention:GRUAttentionLM",
        {**_RECALL, "embed_dim": 32, "hidden_size": 64, "memory": 32, "heads": 1},
        "gru_attention_recall.pt",
        "GRU + attention over its last 32 hidden states; trained on associative recall", task="recall"),
    "lstm_lm": ZooEntry(
        "wmdeploy.models.lstm_lm:LSTMLanguageModel",
        {"vocab_size": 256, "embed_dim": 64, "hidden_size": 256, "num_layers": 1},
        "lstm_lm.pt", "byte-level LSTM LM (preset 'small'); trained on the shipped corpus", task="text"),
    "lstm_lm_2x1024": ZooEntry(
        "wmdeploy.models.lstm_lm:LSTMLanguageModel",
        {"vocab_size": 256, "embed_dim": 256, "hidden_size": 1024, "num_layers": 2},
        None, "2 x 1024 byte LSTM LM, untrained: a memory-bound step for profiling"),
    "stacked_lstm": ZooEntry(
        "wmdeploy.models.stacked_lstm:StackedLSTMRegressor",
        {"in_features": 16, "hidden1": 128, "hidden2": 64, "out_features": 4},
        None, "features -> LSTM(128) -> LSTM(64) -> linear, per step; states of two widths, untrained"),
    "gated_memory": ZooEntry(
        "wmdeploy.models.gated_memory:GatedMemoryLM",
        {"vocab_size": 256, "embed_dim": 32, "hidden_size": 64, "num_layers": 2},
        None, "LSTM written from its gate equations (ONNX Loop over time), 2 layers; untrained"),
    "memory_tokens": ZooEntry(
        "wmdeploy.models.memory_tokens:MemoryTokenTransformer",
        {"vocab_size": 256, "dim": 64, "heads": 4, "layers": 2, "memory_tokens": 8, "n_classes": 4},
        None, "recurrent memory transformer: 8 memory tokens carried across segments; untrained"),
    "sliding_window": ZooEntry(
        "wmdeploy.models.sliding_window:SlidingWindowTransformerLM",
        {"vocab_size": 256, "dim": 64, "heads": 4, "layers": 2, "window": 64},
        "sliding_window.pt", "byte-level Transformer LM, KV cache of the last 64 positions; trained on the corpus",
        task="text"),
}


def build(name: str, config: dict[str, Any] | None = None) -> Any:
    """A fresh (untrained) model of the zoo entry ``name``, with ``config`` overriding its defaults."""
    if name not in ZOO:
        raise KeyError(f"zoo model {name!r}: expected one of {', '.join(ZOO)}")
    entry = ZOO[name]
    return entry.factory()(**{**entry.config, **(config or {})})


def load_checkpoint(module: Any, path: str | Path) -> Any:
    """Load a zoo checkpoint (``{"state_dict", "config", ...}``, or a bare state_dict) into ``module``."""
    import torch  # noqa: PLC0415

    data = torch.load(str(path), map_location="cpu", weights_only=True)
    state = data["state_dict"] if isinstance(data, dict) and "state_dict" in data else data
    module.load_state_dict(state)
    return module.eval()


def load_zoo_model(name: str, trained: bool = True) -> Any:
    """The zoo model ``name`` in eval mode, with its shipped weights when ``trained`` and it has any.

    Built from the config stored in the checkpoint (so a checkpoint always matches its architecture);
    entries without a checkpoint come back freshly initialised (seeded, so reproducible).
    """
    import torch  # noqa: PLC0415

    entry = ZOO.get(name)
    if entry is None:
        raise KeyError(f"zoo model {name!r}: expected one of {', '.join(ZOO)}")
    path = entry.checkpoint_path
    if trained and path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"zoo model {name!r}: checkpoint {path} is missing "
                                    f"(train it with `python -m wmdeploy.models.train {name} --out {path}`)")
        data = torch.load(str(path), map_location="cpu", weights_only=True)
        model = entry.factory()(**data["config"])
        model.load_state_dict(data["state_dict"])
        return model.eval()
    torch.manual_seed(0)
    return build(name).eval()
