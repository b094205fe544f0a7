"""The working memory of a transformers causal LM, read off the cache transformers itself builds for it.

Rather than a table of per-family config keys (head_dim is ``head_dim``, ``hidden_size // num_heads``,
``n_embd // n_head``, ...; conv widths and SSM state sizes differ again), we run the model once on two
tokens with ``use_cache=True`` and read the shapes of what its own cache holds, layer by layer: keys and
values (``[1, kv_heads, 2, head_dim]``) become capacity-long KV buffers, conv and recurrent states keep
their shapes. Whatever new cache layer a later transformers adds either has these attributes or is refused
by name (never a wrong file).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..contract import BATCH, StateSpec
from ..errors import ExportError

POSITION_STATE = "position"


@dataclass(frozen=True)
class CacheTensor:
    """One tensor of the model's cache: its kind, layer, index within the layer, per-stream shape, dtype."""

    kind: str            # "key" | "value" | "conv" | "recurrent"
    layer: int
    index: int           # the state index within a layer (a layer may hold several conv/recurrent states)
    shape: tuple[int, ...]  # per stream, batch axis excluded; KV: (kv_heads, capacity, head_dim)
    dtype: str
    window: int = 0  # a sliding-window layer's window W: its KV buffer is a ring of W - 1 positions (0: capacity-long)

    def _name(self, past: bool) -> str:
        """Optimum's and GenAI's names: past_key_values.{i}.key -> present.{i}.key; past_conv.{i} -> present_conv.{i}."""
        if self.kind in ("key", "value"):
            return f"{'past_key_values' if past else 'present'}.{self.layer}.{self.kind}"
        suffix = f".{self.index}" if self.index else ""
        return f"{'past' if past else 'present'}_{self.kind}.{self.layer}{suffix}"

    @property
    def input_name(self) -> str:
        return self._name(past=True)

    @property
    def output_name(self) -> str:
        return self._name(past=False)

    def state_spec(self, inplace_kv: bool) -> StateSpec:
        doc = {"key": "attention keys, one row per position", "value": "attention values, one row per position",
               "conv": "causal-conv left context", "recurrent": "SSM / linear-attention recurrent state"}[self.kind]
        if self.window:
            doc = f"{doc} modulo {self.window - 1} (a ring: the layer's sliding window of {self.window})"
        inplace = inplace_kv and self.kind in ("key", "value") and not self.window
        return StateSpec(self.input_name, [BATCH, *self.shape], self.dtype, output=self.output_name,
                         doc=doc + (" (in place)" if inplace else ""), inplace=inplace)


@dataclass(frozen=True)
class CacheLayout:
    tensors: tuple[CacheTensor, ...]
    num_layers: int
    sliding: tuple[bool, ...]
    linear: tuple[bool, ...]

    @property
    def has_attention(self) -> bool:
        return any(t.kind == "key" for t in self.tensors)

    @property
    def has_linear_kv(self) -> bool:
        """Whether some attention layer keeps a capacity-long buffer (GroupQueryAttention, a context bound)."""
        return any(t.kind == "key" and not t.window for t in self.tensors)

    @property
    def rings(self) -> frozenset[int]:
        return frozenset(t.layer for t in self.tensors if t.kind == "key" and t.window)

    def states(self, inplace_kv: bool) -> list[StateSpec]:
        """Our states: the position, then every cache tensor (KV in place where the graph aliases them)."""
        position = StateSpec(POSITION_STATE, [BATCH], "int64", output=f"{POSITION_STATE}_out",
                             doc="tokens this stream holds (the next token's position)")
        return [position, *(t.state_spec(inplace_kv) for t in self.tensors)]

    def kv_bytes_per_token(self) -> int:
        total = 0
        for t in self.tensors:
            if t.kind in ("key", "value"):
                total += t.shape[0] * t.shape[2] * torch.empty((), dtype=_TORCH[t.dtype]).element_size()
        return total


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_TORCH = {v: k for k, v in _DTYPE_NAMES.items()}


def _dtype(t: torch.Tensor, where: str) -> str:
    if t.dtype not in _DTYPE_NAMES or t.dtype == torch.bfloat16:
        raise ExportError(f"{where}: cache dtype {t.dtype}; export runs the model in float32 (load it with dtype=float32)")
    return _DTYPE_NAMES[t.dtype]


def probe(model: Any, capacity: int, family: str) -> CacheLayout:
    """Run ``model`` on two tokens with its own cache and turn what the cache holds into our layout (families
    that keep their states elsewhere are laid out by :func:`.recurrent.probe_layout`)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2]]), use_cache=True)
    cache = getattr(out, "past_key_values", None)
    if cache is None:
        cache = getattr(out, "cache_params", None)
    layers = getattr(cache, "layers", None)
    if not layers:
        raise ExportError(f"{family}: the model returned no per-layer cache ({type(cache).__name__}); "
                          "wmdeploy needs a transformers cache (Cache with layers) to lay out its memory")
    tensors: list[CacheTensor] = []
    sliding, linear = [], []
    for i, layer in enumerate(layers):
        name = type(layer).__name__
        found = False
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.ndim == 4 and keys.numel():
            values = layer.values
            if values.shape[-1] != keys.shape[-1]:
                raise ExportError(f"{family} layer {i}: value head size {values.shape[-1]} differs from the key's "
                                  f"{keys.shape[-1]}; not supported")
            kvh, d = int(keys.shape[1]), int(keys.shape[3])
            # a sliding-window layer needs only its window, whatever the capacity: a ring (attention.ring)
            # (W - 1 past keys: with the query's own that is the W keys transformers attends to, and what its
            # DynamicSlidingWindowLayer keeps)
            window = int(getattr(layer, "sliding_window", 0) or 0) if getattr(layer, "is_sliding", False) else 0
            window = window if 1 < window <= capacity else 0
            length = window - 1 if window else capacity
            tensors.append(CacheTensor("key", i, 0, (kvh, length, d), _dtype(keys, f"{family} layer {i}"), window))
            tensors.append(CacheTensor("value", i, 0, (kvh, length, d), _dtype(values, f"{family} layer {i}"), window))
            found = True
        for kind in ("conv", "recurrent"):
            held = getattr(layer, f"{kind}_states", None)
            if isinstance(held, dict):
                for idx, t in sorted(held.items()):
                    if isinstance(t, torch.Tensor):
                        tensors.append(CacheTensor(kind, i, int(idx), tuple(int(s) for s in t.shape[1:]),
                                                   _dtype(t, f"{family} layer {i}")))
                        found = True
        if not found and name != "DummyLayer":
            raise ExportError(f"{family} layer {i}: cache layer {name} holds no keys/values or conv/recurrent "
                              "states wmdeploy can read; this family is not supported yet")
        sliding.append(bool(getattr(layer, "is_sliding", False)))
        linear.append(hasattr(layer, "conv_states"))
    return CacheLayout(tuple(tensors), len(layers), tuple(sliding), tuple(linear))
