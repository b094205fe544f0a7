"""GRUAttentionLM: a GRU with attention over a bounded working memory of its last K hidden states.

Per step: embed the token, run the GRU, attend from the new hidden state over the K previous hidden
states plus itself, and predict the next token from [hidden, attention read-out]. The memory is a
window of the last K GRU outputs, oldest first, carried in the state with ``filled`` (how many slots
hold real states; a fresh stream has none). A chunk appends its outputs and keeps the last K: what falls
out of the window is forgotten.

A chunk is processed with one masked attention over ``cat([memory, chunk])``: step t sees the memory
and the chunk's own earlier steps, limited to the last K (``window_mask``), so streaming in chunks of any
length gives the same numbers as one call over the whole sequence (chunk-invariant).

The memory is kept ordered (shift-and-append) rather than as a ring buffer with a write pointer: the
same content and validity information, no scatter in the graph, and the key order is the age order.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wmdeploy.contract import StateSpec, StreamingSpec, TensorSpec

from ._common import lm_meta, window_mask
from ._layers import attend, merge_heads, split_heads


class GRUAttentionLM(nn.Module):
    def __init__(self, vocab_size: int = 256, embed_dim: int = 32, hidden_size: int = 64, memory: int = 32,
                 heads: int = 1, vocab: dict[str, Any] | None = None) -> None:
        super().__init__()
        if hidden_size % heads:
            raise ValueError(f"GRUAttentionLM: hidden_size {hidden_size} is not divisible by heads {heads}")
        self.vocab_size, self.embed_dim, self.hidden_size = vocab_size, embed_dim, hidden_size
        self.memory, self.heads, self.vocab = memory, heads, vocab
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.gru = nn.GRU(embed_dim, hidden_size, batch_first=True)
        self.q = nn.Linear(hidden_size, hidden_size)
        self.k = nn.Linear(hidden_size, hidden_size)
        self.v = nn.Linear(hidden_size, hidden_size)
        self.mix = nn.Linear(2 * hidden_size, hidden_size)
        self.head = nn.Linear(hidden_size, vocab_size)

    @property
    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"vocab_size": self.vocab_size, "embed_dim": self.embed_dim,
                               "hidden_size": self.hidden_size, "memory": self.memory, "heads": self.heads}
        if self.vocab is not None:
            cfg["vocab"] = self.vocab
        return cfg

    def streaming_spec(self) -> StreamingSpec:
        H, K, V = self.hidden_size, self.memory, self.vocab_size
        return StreamingSpec(
            inputs=[TensorSpec("tokens", ["batch", "time"], "int64")],
            outputs=[TensorSpec("logits", ["batch", "time", V], "float32")],
            states=[StateSpec("h", [1, "batch", H], "float32", doc="GRU hidden state"),
                    StateSpec("memory", ["batch", K, H], "float32", doc="last K GRU outputs, oldest first"),
                    StateSpec("filled", ["batch"], "int64", doc="how many memory slots are valid (<= K)")],
            chunk_invariant=True,
            meta=lm_meta(V, self.vocab, memory=K),
        )

    def forward(self, tokens: torch.Tensor, h: torch.Tensor, memory: torch.Tensor, filled: torch.Tensor):
        K = self.memory
        y, h_next = self.gru(self.embed(tokens), h)  # y [B, T, H]
        steps = tokens.shape[1]
        keys = torch.cat([memory, y], dim=1)  # [B, K+T, H]
        mask = window_mask(steps, K, K + 1, filled).unsqueeze(1)  # K previous states + the current one
        read = attend(split_heads(self.q(y), self.heads), split_heads(self.k(keys), self.heads),
                      split_heads(self.v(keys), self.heads), mask)
        mixed = torch.tanh(self.mix(torch.cat([y, merge_heads(read)], dim=-1)))
        logits = self.head(mixed)
        memory_next = keys[:, -K:]
        filled_next = torch.clamp(filled + steps, max=K)
        return logits, h_next, memory_next, filled_next
