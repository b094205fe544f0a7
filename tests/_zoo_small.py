"""Small configs of every zoo architecture, for tests: the architecture is the zoo's, the size is not."""
from __future__ import annotations

from pathlib import Path

#: zoo name -> constructor overrides that make the model small
SMALL: dict[str, dict] = {
    "gru_attention": {"hidden_size": 32, "memory": 8, "heads": 2},
    "lstm_lm": {"embed_dim": 16, "hidden_size": 32, "num_layers": 2},
    "lstm_lm_2x1024": {"embed_dim": 16, "hidden_size": 32},
    "stacked_lstm": {},
    "gated_memory": {"vocab_size": 40, "embed_dim": 16, "hidden_size": 24},
    "memory_tokens": {"vocab_size": 40, "dim": 32, "memory_tokens": 4},
    "sliding_window": {"vocab_size": 40, "dim": 32, "window": 12},
}


def build_small(name: str):  # type: ignore[no-untyped-def]
    from wmdeploy.models.zoo import build

    return build(name, SMALL[name])


def export_small(name: str, directory: Path, verify: bool = False) -> Path:
    """``directory/<name>.onnx``, exported once (seeded) and reused."""
    import torch

    from wmdeploy.exporter import export

    path = directory / f"{name}.onnx"
    if not path.exists():
        torch.manual_seed(0)
        export(build_small(name).eval(), path, verify=verify)
    return path
