"""GatedMemoryCell: an LSTM cell written out from its gate equations, and GatedMemoryLM, a stack of them.

The cell computes, for every step t (gate order i, f, g, o as in ``nn.LSTM``)::

    i = sigmoid(W_ii x + b_ii + W_hi h + b_hi)        input gate
    f = sigmoid(W_if x + b_if + W_hf h + b_hf)        forget gate
    g = tanh(W_ig x + b_ig + W_hg h + b_hg)           candidate
    o = sigmoid(W_io x + b_io + W_ho h + b_ho)        output gate
    c' = f * c + i * g                                cell
    h' = o * tanh(c')                                 hidden

with plain tensor ops, so that it gives the same numbers as ``nn.LSTM`` with the same weights
(``load_from_lstm`` copies them). The input projection is one matmul over the whole chunk; the
recurrence over time is a TorchScript function, which the ONNX exporter turns into a ``Loop`` whose
trip count is the chunk's length, so the exported graph takes any number of time steps (a Python
loop would be unrolled at the sample length).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .lstm_lm import LayeredLSTMContract


def _gated_recurrence(xw: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
                     w_hh: torch.Tensor, b_hh: torch.Tensor):
    """Run the gate equations over time. ``xw`` [B, T, 4H] is the input projection (bias included)."""
    steps = xw.size(1)
    w_t = w_hh.t()
    outs = []
    for t in range(steps):
        gates = xw[:, t] + torch.matmul(h, w_t) + b_hh
        i, f, g, o = gates.chunk(4, 1)
        i = torch.sigmoid(i)
        f = torch.sigmoid(f)
        g = torch.tanh(g)
        o = torch.sigmoid(o)
        c = f * c + i * g
        h = o * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, 1), h, c


with warnings.catch_warnings():
    # torch.jit.script is deprecated in favour of torch.export, but it is what gives the TorchScript ONNX
    # exporter a loop with a dynamic trip count; revisit when export moves to the dynamo exporter.
    warnings.simplefilter("ignore", DeprecationWarning)
    gated_recurrence = torch.jit.script(_gated_recurrence)


class GatedMemoryCell(nn.Module):
    """One LSTM layer from its gate equations; parameters named and shaped as ``nn.LSTM``'s layer 0."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        k = hidden_size ** -0.5
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size).uniform_(-k, k))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size).uniform_(-k, k))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size).uniform_(-k, k))
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size).uniform_(-k, k))

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        """x [B, T, input], h/c [B, hidden] -> (y [B, T, hidden], h', c')."""
        xw = torch.matmul(x, self.weight_ih.t()) + self.bias_ih
        return gated_recurrence(xw, h, c, self.weight_hh, self.bias_hh)

    @torch.no_grad()
    def load_from_lstm(self, lstm: nn.LSTM, layer: int = 0) -> "GatedMemoryCell":
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(self, name).copy_(getattr(lstm, f"{name}_l{layer}"))
        return self


class GatedMemoryLM(LayeredLSTMContract, nn.Module):
    """Token embedding, ``num_layers`` GatedMemoryCells, next-token logits at every step."""

    def __init__(self, vocab_size: int = 256, embed_dim: int = 32, hidden_size: int = 64, num_layers: int = 2,
                 vocab: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.vocab_size, self.embed_dim, self.hidden_size, self.num_layers = vocab_size, embed_dim, hidden_size, num_layers
        self.vocab = vocab
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.cells = nn.ModuleList(
            GatedMemoryCell(embed_dim if i == 0 else hidden_size, hidden_size) for i in range(num_layers)
        )
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        x = self.embed(tokens)
        hs, cs = [], []
        for layer, cell in enumerate(self.cells):
            x, h_l, c_l = cell(x, h[layer], c[layer])
            hs.append(h_l)
            cs.append(c_l)
        return self.head(x), torch.stack(hs), torch.stack(cs)

    @torch.no_grad()
    def load_from_lstm(self, lstm: nn.LSTM) -> "GatedMemoryLM":
        for layer, cell in enumerate(self.cells):
            cell.load_from_lstm(lstm, layer)
        return self
