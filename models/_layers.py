"""Transformer pieces written with plain ops (matmul, softmax) so that the legacy ONNX exporter emits
simple, ORT-friendly graphs with dynamic sequence lengths."""
from __future__ import annotations

import math

import torch
from torch import nn

NEG = -1e9  # a finite "minus infinity": every query row keeps at least one visible key


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, D] -> [B, heads, T, D/heads]."""
    b, t, d = x.shape
    return x.reshape(b, t, heads, d // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, dh] -> [B, T, heads*dh]."""
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention. q [B,h,T,dh], k/v [B,h,S,dh], mask bool broadcastable to [B,h,T,S]."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = torch.where(mask, scores, torch.full_like(scores, NEG))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def sinusoidal(steps: torch.Tensor | int, dim: int, offset: int = 0) -> torch.Tensor:
    """[steps, dim] sinusoidal position encodings (computed, so the length stays dynamic in ONNX)."""
    pos = torch.arange(steps).to(torch.float32).unsqueeze(1) + offset
    inv = torch.exp(torch.arange(0, dim, 2).to(torch.float32) * (-math.log(10000.0) / dim))
    ang = pos * inv.unsqueeze(0)
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)


def alibi_slopes(heads: int) -> torch.Tensor:
    """The ALiBi head slopes 2^(-8 i / heads), i = 1..heads."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)], dtype=torch.float32)


class PreNormBlock(nn.Module):
    """A pre-norm Transformer block split around its attention, so the encoder (full attention over a
    segment) and the decoder (attention over its KV cache) share the layers and their parameter names."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 4 * dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        return split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads)

    def finish(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The residual after attention output ``a`` (heads split), then the MLP."""
        x = x + self.proj(merge_heads(a))
        return x + self.mlp(self.ln2(x))
