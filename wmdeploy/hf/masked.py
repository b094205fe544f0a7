"""The tail every attention form of :mod:`.attention` and :mod:`.sinks` shares, once the scores are masked by
position: softcap, mask, softmax in float32, weighted values."""
from __future__ import annotations

import torch


def softmax_attend(scores: torch.Tensor, allowed: torch.Tensor, values: torch.Tensor, softcap: float | None
                   ) -> torch.Tensor:
    """Scaled scores -> softcap (Gemma's), mask, softmax in float32, weighted values."""
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(values.dtype), values)
