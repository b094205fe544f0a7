"""MemoryTokenTransformer: a recurrent memory transformer that reads a long sequence segment by segment.

Each call takes one segment of tokens; M memory tokens (the state) are prepended, a small Transformer
encoder (full attention over memory + segment) runs, and the memory positions of its output, layer-
normalised, become the memory for the next segment. A classification head reads the memory, so the
output has no time axis (``[batch, n_classes]``): the class of everything read so far.

The memory passed in is summed with a learned per-slot embedding, which is also what a fresh stream
starts from (the state's initial value is 0). Segmenting changes what the encoder sees together, so
the model is not chunk-invariant.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wmdeploy.contract import StateSpec, StreamingSpec, TensorSpec

from ._layers import PreNormBlock, attend, sinusoidal


class EncoderBlock(PreNormBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(x, attend(*self.qkv_heads(x)))


class MemoryTokenTransformer(nn.Module):
    def __init__(self, vocab_size: int = 256, dim: int = 64, heads: int = 4, layers: int = 2,
                 memory_tokens: int = 8, n_classes: int = 4) -> None:
        super().__init__()
        self.vocab_size, self.dim, self.heads, self.layers = vocab_size, dim, heads, layers
        self.memory_tokens, self.n_classes = memory_tokens, n_classes
        self.embed = nn.Embedding(vocab_size, dim)
        self.memory_embed = nn.Parameter(torch.randn(memory_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads) for _ in range(layers))
        self.memory_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    @property
    def config(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "dim": self.dim, "heads": self.heads, "layers": self.layers,
                "memory_tokens": self.memory_tokens, "n_classes": self.n_classes}

    def streaming_spec(self) -> StreamingSpec:
        return StreamingSpec(
            inputs=[TensorSpec("tokens", ["batch", "time"], "int64", doc="one segment")],
            outputs=[TensorSpec("class_logits", ["batch", self.n_classes], "float32")],
            states=[StateSpec("memory", ["batch", self.memory_tokens, self.dim], "float32",
                              doc="memory tokens carried from segment to segment")],
            chunk_invariant=False,
            meta={"task": "classify", "tokens_input": "tokens", "vocab_size": self.vocab_size,
                  "n_classes": self.n_classes},
        )

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor):
        M = self.memory_tokens
        x = self.embed(tokens) + sinusoidal(tokens.shape[1], self.dim).unsqueeze(0)
        h = torch.cat([memory + self.memory_embed, x], dim=1)
        for block in self.blocks:
            h = block(h)
        memory_next = self.memory_norm(h[:, :M])
        return self.head(memory_next.mean(dim=1)), memory_next
