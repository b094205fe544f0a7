"""SlidingWindowTransformerLM: a decoder-only Transformer whose working memory is a fixed-size KV cache.

Every layer attends over the last W positions (itself included) with ALiBi distance biases, so no
absolute position is needed and the cache never grows: the state is, per layer, the keys and values of
the last W positions (oldest first) and ``filled``, how many of them are real. A call takes a chunk of
tokens, attends over ``cat([cache, chunk])`` with the band mask of ``window_mask`` and keeps the last W
keys/values. Streaming in chunks gives the same numbers as ``forward_full`` — one pass over the whole
sequence with the sliding-window mask — which is what makes the model chunk-invariant.

The chunk may be longer than W (the band mask still limits every query to the last W positions); the
cost of a call is O(T * (W + T)), so stream long inputs in chunks of at most about W.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wmdeploy.contract import StateSpec, StreamingSpec, TensorSpec

from ._common import lm_meta, window_mask
from ._layers import PreNormBlock, alibi_slopes, attend


DecoderBlock = PreNormBlock  # attention over the KV cache is written out in SlidingWindowTransformerLM


class SlidingWindowTransformerLM(nn.Module):
    def __init__(self, vocab_size: int = 256, dim: int = 64, heads: int = 4, layers: int = 2, window: int = 64,
                 vocab: dict[str, Any] | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"SlidingWindowTransformerLM: dim {dim} is not divisible by heads {heads}")
        self.vocab_size, self.dim, self.heads, self.layers, self.window = vocab_size, dim, heads, layers, window
        self.vocab = vocab
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        self.register_buffer("slopes", alibi_slopes(heads), persistent=False)

    @property
    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"vocab_size": self.vocab_size, "dim": self.dim, "heads": self.heads,
                               "layers": self.layers, "window": self.window}
        if self.vocab is not None:
            cfg["vocab"] = self.vocab
        return cfg

    def streaming_spec(self) -> StreamingSpec:
        L, Hd, W, dh, V = self.layers, self.heads, self.window, self.dim // self.heads, self.vocab_size
        return StreamingSpec(
            inputs=[TensorSpec("tokens", ["batch", "time"], "int64")],
            outputs=[TensorSpec("logits", ["batch", "time", V], "float32")],
            states=[StateSpec("k_cache", ["batch", L, Hd, W, dh], "float32", doc="keys of the last W positions"),
                    StateSpec("v_cache", ["batch", L, Hd, W, dh], "float32", doc="values of the last W positions"),
                    StateSpec("filled", ["batch"], "int64", doc="how many cache slots are valid (<= W)")],
            chunk_invariant=True,
            meta=lm_meta(V, self.vocab, window=W),
        )

    def _alibi(self, steps: Any, keys: Any, query_offset: Any) -> torch.Tensor:
        """[1, heads, T, S] bias -slope * (query position - key position)."""
        t = torch.arange(steps).unsqueeze(1) + query_offset
        j = torch.arange(keys).unsqueeze(0)
        dist = (t - j).to(torch.float32)
        return -(self.slopes.view(1, -1, 1, 1) * dist.unsqueeze(0).unsqueeze(0))

    def forward(self, tokens: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, filled: torch.Tensor):
        W = self.window
        steps = tokens.shape[1]
        mask = window_mask(steps, W, W, filled).unsqueeze(1)  # [B, 1, T, W+T]
        bias = self._alibi(steps, steps + W, W)
        x = self.embed(tokens)
        k_next, v_next = [], []
        for layer, block in enumerate(self.blocks):
            q, k, v = block.qkv_heads(x)
            k_all = torch.cat([k_cache[:, layer], k], dim=2)  # [B, heads, W+T, dh]
            v_all = torch.cat([v_cache[:, layer], v], dim=2)
            x = block.finish(x, attend(q, k_all, v_all, mask, bias))
            k_next.append(k_all[:, :, -W:])
            v_next.append(v_all[:, :, -W:])
        logits = self.head(self.norm(x))
        filled_next = torch.clamp(filled + steps, max=W)
        return logits, torch.stack(k_next, dim=1), torch.stack(v_next, dim=1), filled_next

    def forward_full(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits for a whole sequence from scratch with the sliding-window mask (no cache): the reference
        that streaming must reproduce."""
        T = tokens.shape[1]
        i = torch.arange(T).unsqueeze(1)
        j = torch.arange(T).unsqueeze(0)
        mask = ((j <= i) & (j > i - self.window)).view(1, 1, T, T)
        bias = -(self.slopes.view(1, -1, 1, 1) * (i - j).to(torch.float32).view(1, 1, T, T))
        x = self.embed(tokens)
        for block in self.blocks:
            q, k, v = block.qkv_heads(x)
            scores = torch.matmul(q, k.transpose(-1, -2)) / (q.shape[-1] ** 0.5) + bias
            scores = scores.masked_fill(~mask, float("-inf"))
            x = block.finish(x, torch.matmul(torch.softmax(scores, dim=-1), v))
        return self.head(self.norm(x))
