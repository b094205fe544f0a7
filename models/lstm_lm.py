"""LSTMLanguageModel: token embedding, a multi-layer ``nn.LSTM``, next-token logits at every step.

The working memory is the LSTM's hidden and cell state, ``[num_layers, batch, hidden]`` each. The
largest preset (``2x1024``, ~14 M LSTM weights, ~56 MB fp32) makes a batch-1 step memory-bound on a
CPU, which is what profiling needs to compare a step against the weight-bytes / bandwidth floor.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wmdeploy.contract import StateSpec, StreamingSpec, TensorSpec

from ._common import lm_meta

#: Named sizes: embed_dim, hidden_size, num_layers (vocab_size defaults to 256 bytes).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"embed_dim": 16, "hidden_size": 32, "num_layers": 1},
    "small": {"embed_dim": 64, "hidden_size": 256, "num_layers": 1},
    "1x512": {"embed_dim": 128, "hidden_size": 512, "num_layers": 1},
    "2x256": {"embed_dim": 64, "hidden_size": 256, "num_layers": 2},
    "2x512": {"embed_dim": 128, "hidden_size": 512, "num_layers": 2},
    "2x1024": {"embed_dim": 256, "hidden_size": 1024, "num_layers": 2},
}


class LayeredLSTMContract:
    """The streaming interface of a layered LSTM language model (shared with ``GatedMemoryLM``, which
    must be interchangeable with this model): tokens in, logits out, ``h``/``c`` per layer as state."""

    vocab_size: int
    embed_dim: int
    hidden_size: int
    num_layers: int
    vocab: dict[str, Any] | None

    @property
    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"vocab_size": self.vocab_size, "embed_dim": self.embed_dim,
                               "hidden_size": self.hidden_size, "num_layers": self.num_layers}
        if self.vocab is not None:
            cfg["vocab"] = self.vocab
        return cfg

    def streaming_spec(self) -> StreamingSpec:
        L, H, V = self.num_layers, self.hidden_size, self.vocab_size
        return StreamingSpec(
            inputs=[TensorSpec("tokens", ["batch", "time"], "int64")],
            outputs=[TensorSpec("logits", ["batch", "time", V], "float32")],
            states=[StateSpec("h", [L, "batch", H], "float32", doc="hidden state per layer"),
                    StateSpec("c", [L, "batch", H], "float32", doc="cell state per layer")],
            chunk_invariant=True,
            meta=lm_meta(V, self.vocab),
        )


class LSTMLanguageModel(LayeredLSTMContract, nn.Module):
    """A byte-level (by default) LSTM language model that streams one chunk of tokens per call."""

    def __init__(self, vocab_size: int = 256, embed_dim: int = 64, hidden_size: int = 256, num_layers: int = 1,
                 vocab: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.vocab = vocab
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "LSTMLanguageModel":
        if name not in PRESETS:
            raise ValueError(f"LSTMLanguageModel preset {name!r}: expected one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def forward(self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        x = self.embed(tokens)
        y, (h_next, c_next) = self.lstm(x, (h, c))
        return self.head(y), h_next, c_next
