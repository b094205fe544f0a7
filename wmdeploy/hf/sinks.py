"""``--overflow sinks:K``: StreamingLLM attention for the capacity-long layers of a RoPE model.

The memory of such a layer stays ``C`` slots (``--max-context``): slots ``0..K-1`` keep the first K tokens (the
attention sinks) and slots ``K..C-1`` are a ring of the most recent ``R = C - K`` tokens (position ``p >= K``
lives in slot ``K + (p - K) % R``). A query at position ``q`` attends to the sinks, the recent keys
``[q - R, q)`` and itself: below the capacity (``q < C``) that is every earlier token, exactly what the
``error`` file computes.

Positions are assigned as the paper does, *within the cache*: the sinks at ``0..K-1``, the recent keys at
``K..C-1`` in order, the query at ``C``. RoPE scores depend only on the difference of the two positions, so for
a recent key that difference is the true distance ``q - p``, and the keys can stay cached as transformers
rotates them (at their absolute positions: no re-rotation of the ring). Only the sinks' distance changes, to
``C - s`` instead of ``q - s``: their scores use the query rotated back by ``q - C`` (``R(-(q - C))``, the
model's own rotary embedding and ``apply_rotary_pos_emb``, the attention scaling of its RoPE type divided
out). So the cache is keys after RoPE, and the re-rotation touches one query per head, not the cache.

Cost: like ``--attention portable`` (each step gathers the new buffer and attends over the whole capacity);
the memory is constant, so a stream never ends.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from ..errors import ExportError
from .masked import softmax_attend
from .rotary import rope_kinds

#: families whose RoPE this module can re-rotate (the default rope type, cached keys after RoPE)
FAMILIES = ("llama", "qwen2", "qwen3", "phi3", "mistral")


def parse_overflow(value: str | None) -> int | None:
    """``error`` (None: refuse the step past the capacity) or ``sinks:K`` (K >= 0 sink tokens)."""
    if value is None or value == "error":
        return None
    if isinstance(value, str) and value.startswith("sinks:") and value[6:].isdigit():
        return int(value[6:])
    raise ExportError(f"--overflow {value!r}: expected 'error' or 'sinks:K' (K sink tokens, e.g. sinks:4)")


class Rerotator:
    """``rotate(x, delta)``: ``x`` [b, h, t, d] (after RoPE at some positions) rotated by ``delta`` [b, t] more
    positions, with the model's own rotary embedding and its modeling file's ``apply_rotary_pos_emb``."""

    def __init__(self, model: Any, family: str) -> None:
        if family not in FAMILIES:
            raise ExportError(f"--overflow sinks: model_type '{family}' is not supported (supported: "
                              f"{', '.join(FAMILIES)}: RoPE families whose rotation wmdeploy re-applies)")
        kinds = rope_kinds(model.config) - {"default"}
        if kinds:
            raise ExportError(f"--overflow sinks: rope type '{', '.join(sorted(kinds))}' rescales positions; only the default RoPE "
                              "is re-rotated exactly")
        inner = getattr(model, "model", model)
        self.rotary = getattr(inner, "rotary_emb", None)
        layers = getattr(inner, "layers", None)
        attn = getattr(layers[0], "self_attn", None) if layers is not None and len(layers) else None
        module = sys.modules.get(type(attn).__module__) if attn is not None else None
        self.apply: Callable[..., Any] | None = getattr(module, "apply_rotary_pos_emb", None)
        if self.rotary is None or self.apply is None:
            raise ExportError(f"--overflow sinks: {family} has no rotary_emb / apply_rotary_pos_emb where "
                              "transformers keeps them; cannot re-rotate its queries")
        self.scaling = float(getattr(self.rotary, "attention_scaling", 1.0) or 1.0)

    def __call__(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary(x, delta)
        if self.scaling != 1.0:  # a pure rotation: the RoPE type's attention factor is applied once already
            cos, sin = cos / self.scaling, sin / self.scaling
        return self.apply(x, x, cos, sin)[0]


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, buf_k: torch.Tensor, buf_v: torch.Tensor,
                   position: torch.Tensor, scale: float, sinks: int, softcap: float | None,
                   rotate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [b, h, t, d], k/v [b, kvh, t, d], buffers [b, kvh, C, d] -> (out [b, t, h, d], new buffers)."""
    b, h, t, d = q.shape
    kvh, cap = k.shape[1], buf_k.shape[2]
    ring = cap - sinks
    dev = q.device
    start = position[:, None]                                             # [b, 1]
    slot = torch.arange(cap, device=dev)[None, :]                         # [1, C]
    # the position each slot holds before this chunk: a sink slot s holds s; a ring slot the latest p < start
    # with p = K + r (mod R); -1 where nothing is held yet
    r = slot - sinks
    latest = start - 1 - torch.remainder(start - 1 - sinks - r, ring)
    held = torch.where(slot < sinks, slot.expand(b, cap), latest)
    held = torch.where((held >= 0) & (held < start) & ((slot < sinks) | (held >= sinks)), held, torch.full_like(held, -1))
    new_pos = start + torch.arange(t, device=dev)[None, :]                # [b, t]
    kpos = torch.cat([held, new_pos], dim=1)[:, None, None, :]            # [b, 1, 1, C + t]
    qpos = new_pos[:, None, :, None]                                      # [b, 1, t, 1]
    is_sink = kpos < sinks
    allowed = (kpos >= 0) & (kpos <= qpos) & (is_sink | (kpos >= qpos - ring))
    keys, values = torch.cat([buf_k, k], dim=2), torch.cat([buf_v, v], dim=2)
    rep = h // kvh
    if rep > 1:
        keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    if sinks:
        # the sinks sit at distance C - s from the query (positions within the cache), not q - s
        back = -torch.clamp(new_pos - cap, min=0)                         # [b, t]: -(q - C) past the capacity
        sink_scores = torch.matmul(rotate(q, back), keys.transpose(-1, -2)) * scale
        scores = torch.where(is_sink, sink_scores, scores)
    out = softmax_attend(scores, allowed, values, softcap)
    # the new buffers: each slot takes the chunk's key for the latest position it must hold after the chunk,
    # else keeps its own (a gather, so a chunk longer than the ring never writes one slot twice)
    end = start + t
    after = torch.where(slot < sinks, slot.expand(b, cap), end - 1 - torch.remainder(end - 1 - sinks - r, ring))
    from_chunk = (after >= start) & (after < end) & ((slot < sinks) | (after >= sinks))   # [b, C]
    index = torch.clamp(after - start, 0, t - 1)[:, None, :, None]
    pick_k = torch.gather(k, 2, index.expand(b, kvh, cap, k.shape[-1]))
    pick_v = torch.gather(v, 2, index.expand(b, kvh, cap, v.shape[-1]))
    mask = from_chunk[:, None, :, None]
    return out.transpose(1, 2).contiguous(), torch.where(mask, pick_k, buf_k), torch.where(mask, pick_v, buf_v)
