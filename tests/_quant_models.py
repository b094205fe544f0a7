"""Small zoo models exported once per test session, for the optimize/quantize/drift tests."""
from __future__ import annotations

from pathlib import Path

#: small configs of every zoo model (defaults are already small for gru_attention)
SMALL_ZOO = {
    "gru_attention": {},
    "lstm_lm": {"hidden_size": 64, "embed_dim": 16},
    "stacked_lstm": {"hidden1": 32, "hidden2": 16},
    "gated_memory": {"hidden_size": 32, "embed_dim": 16},
    "memory_tokens": {"dim": 32},
    "sliding_window": {"dim": 32, "window": 16},
}


def export_small(name: str, directory: Path) -> Path:
    import torch

    from wmdeploy.exporter import export
    from wmdeploy.models.zoo import build

    path = directory / f"{name}.onnx"
    if not path.exists():
        torch.manual_seed(0)
        export(build(name, SMALL_ZOO[name]).eval(), path, verify=False)
    return path
