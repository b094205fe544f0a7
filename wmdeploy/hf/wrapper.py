"""A transformers causal LM as a module of our streaming contract: ``forward(tokens, position, *cache)``.

Each row of the batch is its own stream at its own ``position``: ``position_ids`` are
``position + arange(time)`` per row (RoPE and learned position embeddings alike), attention writes and
reads the row's KV buffers at those positions (:mod:`.attention`), recurrent layers read and return their
conv/SSM states (:mod:`.recurrent`), and ``position + time`` is the next position. The model itself runs
unchanged: only its attention implementation and the cache object it is handed are ours.
"""
from __future__ import annotations

from typing import Any

import torch

from ..contract import BATCH, StreamingSpec, TensorSpec
from . import attention
from .attention import StepContext
from .cache import ExplicitCache
from .layout import CacheLayout


class StreamingCausalLM(torch.nn.Module):
    """Wraps ``model`` (an ``AutoModelForCausalLM``) with the explicit-state interface; see the module doc."""

    def __init__(self, model: torch.nn.Module, layout: CacheLayout, form: str, meta: dict[str, Any],
                 forward_kwargs: dict[str, Any] | None = None, sinks: int | None = None, rotate: Any = None,
                 rope: Any = None) -> None:
        super().__init__()
        self.sinks, self.rotate = sinks, rotate  # --overflow sinks:K (attention.StepContext)
        self.rope = rope  # rotary.RotaryTables while RoPE is deferred into GQA (rotary.deferred)
        if form not in attention.FORMS:
            raise ValueError(f"attention form {form!r}: expected one of {attention.FORMS}")
        self.model, self.layout, self.form, self.meta = model, layout, form, meta
        self.vocab_size = int(meta["vocab_size"])
        self.forward_kwargs = forward_kwargs or {}

    def streaming_spec(self) -> StreamingSpec:
        return StreamingSpec(
            inputs=[TensorSpec("tokens", [BATCH, "time"], "int64", doc="token ids", index_bound=self.vocab_size)],
            outputs=[TensorSpec("logits", [BATCH, "time", self.vocab_size], "float32")],
            states=self.layout.states(inplace_kv=self.form == "gqa" and self.sinks is None),
            meta=self.meta,
        )

    def forward(self, tokens: torch.Tensor, position: torch.Tensor, *cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, t = tokens.shape
        tensors = self.layout.tensors
        ctx = StepContext(self.form, position, {}, rings=self.layout.rings, sinks=self.sinks, rotate=self.rotate)
        keys: dict[int, torch.Tensor] = {}
        for spec, value in zip(tensors, cache):
            if spec.kind == "key":
                keys[spec.layer] = value
            elif spec.kind == "value":
                ctx.past[spec.layer] = (keys[spec.layer], value)
            elif spec.kind == "conv":
                ctx.conv[(spec.layer, spec.index)] = value
            else:
                ctx.recurrent[(spec.layer, spec.index)] = value
        end = position + t
        if self.layout.has_linear_kv and self.form == "gqa" and self.sinks is None:
            ctx.seqlens_k = (end - 1).to(torch.int32)
            ctx.total_length = end.max().to(torch.int32)
        position_ids = position[:, None] + torch.arange(t, device=tokens.device)[None, :]
        ctx.position_ids, ctx.rope = position_ids, self.rope
        if self.rope is not None:
            self.rope.pending = 0
        # A 4-D mask is taken as prepared (transformers builds none); our attention masks by position itself.
        mask = torch.zeros((b, 1, t, 1), dtype=torch.float32, device=tokens.device)
        cache_obj = ExplicitCache(ctx, self.layout.num_layers, list(self.layout.sliding), list(self.layout.linear))
        attention.set_context(ctx)
        try:
            out = self.model(input_ids=tokens, attention_mask=mask, position_ids=position_ids, cache=cache_obj,
                             use_cache=True, return_dict=True, **self.forward_kwargs)
        finally:
            attention.set_context(None)
        if self.rope is not None and self.rope.pending:
            from .rotary import NotDeferred  # noqa: PLC0415

            raise NotDeferred(f"{self.rope.pending} deferred RoPE rotation(s) reached no attention node")
        nxt: list[torch.Tensor] = []
        for spec, value in zip(tensors, cache):
            if spec.kind in ("key", "value"):
                got = ctx.present.get(spec.layer)
                if got is None:
                    raise RuntimeError(f"layer {spec.layer}: the model did not call the wmdeploy attention "
                                       "(its attention module bypasses transformers' AttentionInterface)")
                nxt.append(got[0] if spec.kind == "key" else got[1])
            else:
                held = (ctx.conv_out if spec.kind == "conv" else ctx.recurrent_out).get((spec.layer, spec.index))
                if held is None:
                    raise RuntimeError(f"layer {spec.layer}: the model did not update its {spec.kind} state "
                                       "through the explicit cache")
                nxt.append(held)
        return (out.logits.float(), end, *nxt)
