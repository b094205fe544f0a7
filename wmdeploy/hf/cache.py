"""The cache object handed to a transformers model during an explicit-state forward.

transformers' own caches hold their tensors inside Python objects that grow (``DynamicCache``) or carry one
batch-wide position (``StaticCache``). Ours holds nothing: ``update`` returns this chunk's keys and values
unchanged, and the attention function (:mod:`.attention`) reads the layer's buffers, writes the new rows at
each row's own position and attends; the wrapper collects the results as the next states. The recurrent
layers of SSMs and hybrids (conv and SSM/linear-attention states) go through :mod:`.recurrent`, which reads
and records their states in the same :class:`~.attention.StepContext`.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from .attention import StepContext


class ExplicitCache(Cache):
    """A stand-in ``Cache`` whose state lives in the wrapper's tensors (see the module doc)."""

    def __init__(self, ctx: StepContext, num_layers: int, sliding: list[bool] | None = None,
                 linear: list[bool] | None = None) -> None:
        # Cache.__init__ builds layer objects we do not use; the attributes transformers reads are set here.
        self.ctx = ctx
        self.layers = []
        self.layer_class_to_replicate = None
        self.offloading = False
        self._num_layers = num_layers
        self._sliding = sliding or [False] * num_layers
        self._linear = linear or [False] * num_layers

    # ---- attention ------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are per row and explicit (position_ids); nothing may build on a global length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def __len__(self) -> int:
        return self._num_layers

    @property
    def is_sliding(self) -> list[bool]:
        return self._sliding

    @property
    def is_linear(self) -> list[bool]:
        return self._linear

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self._num_layers

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return True

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        return 0

    # ---- recurrent layers: see .recurrent ---------------------------------------------------------------
    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return True  # the explicit state is always there (zeros at the start): the "continue" branch is exact

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        return self.ctx.conv.get((layer_idx, state_idx))

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        return self.ctx.recurrent.get((layer_idx, state_idx))

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs: Any) -> torch.Tensor:
        """Prepend the held conv state to this chunk's inputs (the causal conv needs the left context), and
        record the last ``kernel`` columns as the next state; returns the concatenation."""
        past = self.ctx.conv[(layer_idx, state_idx)]
        full = torch.cat([past, conv_states.to(past.dtype)], dim=-1)
        self.ctx.conv_out[(layer_idx, state_idx)] = full[..., -past.shape[-1]:]
        return full

    def update_recurrent_state(self, recurrent_states: Any, layer_idx: int, state_idx: int = 0, **kwargs: Any) -> torch.Tensor:
        last = recurrent_states if isinstance(recurrent_states, torch.Tensor) else recurrent_states[-1]
        self.ctx.recurrent_out[(layer_idx, state_idx)] = last
        return last

    def increase_count(self, layer_idx: int, state_idx: int) -> None:
        pass

    def reset(self) -> None:  # pragma: no cover - never called on an explicit cache
        raise NotImplementedError("ExplicitCache holds no state to reset")
