"""Attention over an explicit, per-stream KV cache: the function transformers' attention modules call.

We register it with transformers' ``AttentionInterface`` under :data:`IMPLEMENTATION` and set the model's
``_attn_implementation`` to it, so every family whose attention module goes through the interface (after its
own projections, norms and RoPE) reaches us with the *new* keys and values of this chunk (the explicit cache
returns them unchanged from ``update``). Each row of the batch sits at its own position: it writes its new
K/V at ``position .. position + time - 1`` of its buffer and attends to ``[0, position + time)`` (or the
family's sliding window of it).

Two forms, one torch reference:

* ``gqa`` (ONNX Runtime): one ``com.microsoft.GroupQueryAttention`` node per layer with per-row
  ``seqlens_k``. Its past and present K/V are one buffer (the runtime binds the same memory as input and
  output, ``past_present_share_buffer``), so a step writes only the new positions and attends only to each
  row's live prefix: its cost follows the context, not the capacity.
* ``portable`` (standard ONNX, for OpenVINO and other engines): ``ScatterElements`` of the new rows into a
  copy of the buffer and a masked attention over the whole capacity. Correct everywhere; each step copies
  and scans the capacity (measured in ``bench/bench_hf.py``).

In eager torch (export's trace, checks) both compute the same thing with plain tensor ops.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from .masked import softmax_attend

IMPLEMENTATION = "wmdeploy_kv"
FORMS = ("gqa", "portable")


@dataclass
class StepContext:
    """What the attention function needs besides the module's own tensors, for one forward call."""

    form: str
    position: torch.Tensor            # [batch] int64: tokens each row already holds
    past: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (key buffer, value buffer) [b, kvh, cap, d]
    present: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    rings: frozenset[int] = frozenset()  # sliding-window layers whose buffers are rings of their window
    sinks: int | None = None  # --overflow sinks:K: capacity-long layers keep K sinks + a ring (:mod:`.sinks`)
    rotate: Any = None        # ... and re-rotate queries with the model's RoPE (sinks.Rerotator)
    seqlens_k: torch.Tensor | None = None   # [batch] int32: position + time - 1 (GQA)
    total_length: torch.Tensor | None = None  # scalar int32: max(position + time) (GQA)
    rope: Any = None  # rotary.RotaryTables: RoPE deferred into the GQA node (rotary.deferred)
    position_ids: torch.Tensor | None = None  # [batch, time]: position + arange(time)
    # recurrent layers (SSM / conv / linear attention): (layer, state index) -> held and next states
    conv: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    conv_out: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    recurrent: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    recurrent_out: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)


_local = threading.local()


def set_context(ctx: StepContext | None) -> None:
    _local.ctx = ctx


def current_position_ids() -> torch.Tensor | None:
    """The position ids [batch, time] of the forward in progress on this thread (None outside one)."""
    ctx = getattr(_local, "ctx", None)
    return None if ctx is None else ctx.position_ids


def _context() -> StepContext:
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        raise RuntimeError("wmdeploy KV attention called outside an explicit-cache forward")
    return ctx


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
              position: torch.Tensor, scale: float, window: int | None, softcap: float | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [b, h, t, d], k/v [b, kvh, t, d], buffers [b, kvh, cap, d] -> (out [b, t, h, d], new buffers)."""
    b, h, t, d = q.shape
    kvh, cap = k.shape[1], past_k.shape[2]
    idx = position[:, None] + torch.arange(t, device=q.device)          # [b, t] absolute positions
    gather = idx[:, None, :, None].expand(b, kvh, t, k.shape[-1])
    full_k = past_k.scatter(2, gather, k)
    full_v = past_v.scatter(2, idx[:, None, :, None].expand(b, kvh, t, v.shape[-1]), v)
    qpos = idx[:, None, :, None]                                          # [b, 1, t, 1]
    kpos = torch.arange(cap, device=q.device)[None, None, None, :]        # [1, 1, 1, cap]
    allowed = kpos <= qpos
    if window:
        allowed = allowed & (kpos > qpos - window)
    rep = h // kvh
    keys = full_k.repeat_interleave(rep, dim=1) if rep > 1 else full_k
    values = full_v.repeat_interleave(rep, dim=1) if rep > 1 else full_v
    out = softmax_attend(torch.matmul(q, keys.transpose(-1, -2)) * scale, allowed, values, softcap)  # [b, h, t, d]
    return out.transpose(1, 2).contiguous(), full_k, full_v


def ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor,
         position: torch.Tensor, scale: float, window: int, softcap: float | None
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sliding-window layer (window W) whose buffer is a ring of R = W - 1 positions (both forms): slot ``s``
    holds the key of the latest position ``p < position`` with ``p % R == s``. The chunk attends to the ring as
    it was plus its own keys (masked by absolute position: within the window, causal), then its last
    ``min(time, R)`` keys are written at ``p % R`` — writing first would overwrite keys the chunk's earlier
    queries still need. Keys are cached after RoPE at their absolute positions, as transformers caches them:
    exact, forever, in a constant state."""
    b, h, t, d = q.shape
    kvh, size = k.shape[1], ring_k.shape[2]
    dev = q.device
    start = position[:, None]
    slot_pos = start - 1 - torch.remainder(start - 1 - torch.arange(size, device=dev)[None, :], size)  # [b, W]
    new_pos = start + torch.arange(t, device=dev)[None, :]                                            # [b, t]
    kpos = torch.cat([slot_pos, new_pos], dim=1)[:, None, None, :]                                    # [b,1,1,W+t]
    qpos = new_pos[:, None, :, None]
    allowed = (kpos >= 0) & (kpos <= qpos) & (kpos > qpos - window)
    keys, values = torch.cat([ring_k, k], dim=2), torch.cat([ring_v, v], dim=2)
    rep = h // kvh
    if rep > 1:
        keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
    out = softmax_attend(torch.matmul(q, keys.transpose(-1, -2)) * scale, allowed, values, softcap)
    # the last min(t, R) keys (a slice from -R clamps to the whole chunk when it is shorter): unique slots
    slots = torch.remainder(new_pos[:, -size:], size)[:, None, :, None]
    tail_k, tail_v = k[:, :, -size:], v[:, :, -size:]
    new_k = ring_k.scatter(2, slots.expand(b, kvh, tail_k.shape[2], k.shape[-1]), tail_k)
    new_v = ring_v.scatter(2, slots.expand(b, kvh, tail_v.shape[2], v.shape[-1]), tail_v)
    return out.transpose(1, 2).contiguous(), new_k, new_v


class _GroupQueryAttention(torch.autograd.Function):
    """Eager: :func:`reference`. Exported (TorchScript): one ``com.microsoft.GroupQueryAttention``."""

    @staticmethod
    def forward(ctx: Any, q3: torch.Tensor, k3: torch.Tensor, v3: torch.Tensor, past_k: torch.Tensor,
                past_v: torch.Tensor, seqlens_k: torch.Tensor, total_length: torch.Tensor, position: torch.Tensor,
                num_heads: int, kv_heads: int, scale: float, window: int, softcap: float,
                cos_cache: torch.Tensor | None = None, sin_cache: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = q3.shape
        d = past_k.shape[-1]
        q = q3.view(b, t, num_heads, d).transpose(1, 2)
        k = k3.view(b, t, kv_heads, d).transpose(1, 2)
        v = v3.view(b, t, kv_heads, d).transpose(1, 2)
        if cos_cache is not None and sin_cache is not None:  # do_rotary: q and k arrive unrotated
            from .rotary import half_rotation  # noqa: PLC0415

            idx = position[:, None] + torch.arange(t, device=q.device)[None, :]
            q = half_rotation(q, cos_cache[idx], sin_cache[idx])
            k = half_rotation(k, cos_cache[idx], sin_cache[idx])
        out, full_k, full_v = reference(q, k, v, past_k, past_v, position, scale, window or None, softcap or None)
        return out.reshape(b, t, num_heads * d), full_k, full_v

    @staticmethod
    def symbolic(g: Any, q3: Any, k3: Any, v3: Any, past_k: Any, past_v: Any, seqlens_k: Any, total_length: Any,
                 position: Any, num_heads: int, kv_heads: int, scale: float, window: int, softcap: float,
                 cos_cache: Any = None, sin_cache: Any = None) -> Any:
        attrs: dict[str, Any] = {"num_heads_i": num_heads, "kv_num_heads_i": kv_heads, "scale_f": scale}
        rope = [] if cos_cache is None or sin_cache is None else [cos_cache, sin_cache]
        if rope:
            attrs["do_rotary_i"] = 1  # non-interleaved halves, as transformers' rotate_half (rotary.py)
        if window:
            # transformers' window W keeps W keys (the query's own included). What GQA's local_window_size L keeps
            # changed between ONNX Runtime versions (L + 1 keys in the older CPU/CUDA kernels, L keys in 1.32,
            # whose windowed-cache docs say "min(T, W)"), so the offset is measured on the installed runtime.
            attrs["local_window_size_i"] = window - gqa_window_offset()
        if softcap:
            attrs["softcap_f"] = softcap
        out, present_k, present_v = g.op("com.microsoft::GroupQueryAttention", q3, k3, v3, past_k, past_v,
                                         seqlens_k, total_length, *rope, outputs=3, **attrs)
        out.setType(q3.type())
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return out, present_k, present_v


@functools.lru_cache(maxsize=None)
def gqa_window_offset() -> int:
    """W - L: how many keys fewer GQA's ``local_window_size`` L names than the window W it keeps, on the
    installed ONNX Runtime (1: older kernels keep L + 1 keys; 0: 1.32 keeps L). Measured once on one tiny node:
    a single query at position 5 with L = 2, compared with :func:`reference` at windows 2 and 3."""
    import numpy as np  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415
    from onnx import TensorProto, helper  # noqa: PLC0415

    from ..errors import ExportError  # noqa: PLC0415

    h, kvh, d, cap, pos, size = 2, 1, 16, 8, 5, 2
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sl", "tl"], ["o", "ok", "ov"],
                            domain="com.microsoft", num_heads=h, kv_num_heads=kvh, scale=d ** -0.5,
                            local_window_size=size)
    shapes = {"q": [1, 1, h * d], "k": [1, 1, kvh * d], "v": [1, 1, kvh * d], "pk": [1, kvh, cap, d],
              "pv": [1, kvh, cap, d]}
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()]
    inputs += [helper.make_tensor_value_info("sl", TensorProto.INT32, [1]),
               helper.make_tensor_value_info("tl", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("o", "ok", "ov")]
    proto = helper.make_model(helper.make_graph([node], "window_probe", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    feeds["pk"][:, :, pos + 1:] = 0
    feeds["pv"][:, :, pos + 1:] = 0
    feeds.update(sl=np.array([pos], np.int32), tl=np.array(pos + 1, np.int32))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["o"], {k: v.copy() for k, v in feeds.items()})[0]
    t = {n: torch.from_numpy(v) for n, v in feeds.items() if n in shapes}
    q, k, v = (t[n].view(1, 1, -1, d).transpose(1, 2) for n in ("q", "k", "v"))
    for offset in (0, 1):
        want = reference(q, k, v, t["pk"], t["pv"], torch.tensor([pos]), d ** -0.5, size + offset, None)[0]
        if np.abs(want.reshape(got.shape).numpy() - got).max() < 1e-4:
            return offset
    raise ExportError(f"onnxruntime {ort.__version__}: GroupQueryAttention's local_window_size keeps neither L nor "
                      "L + 1 keys; export the sliding-window model with --attention portable")


def kv_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                 sliding_window: int | None = None, softcap: float | None = None, **kwargs: Any
                 ) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature: q [b, h, t, d], k/v [b, kvh, t, d] (this chunk's only)."""
    ctx = _context()
    layer = int(module.layer_idx)
    past_k, past_v = ctx.past[layer]
    b, h, t, d = query.shape
    kvh = key.shape[1]
    # Under tracing, sizes are traced values; heads and head size are constants of the model (attributes of
    # the exported node), the batch and time sizes stay dynamic.
    h, kvh, d = int(h), int(kvh), int(d)
    if key.shape[-1] != d or value.shape[-1] != d:
        raise NotImplementedError(f"layer {layer}: value head size {value.shape[-1]} differs from the query's {d}")
    scale = float(scaling) if scaling is not None else d ** -0.5
    window = int(sliding_window) if sliding_window else 0
    cap = float(softcap) if softcap else 0.0
    if window and layer in ctx.rings:  # a ring of its window (layout.probe)
        kind = "ring"
    elif ctx.sinks is not None and not window:  # StreamingLLM past the capacity
        kind = "sinks"
    else:
        kind = ctx.form
    table = _deferred_table(ctx, query, key)
    if table is not None and kind != "gqa":  # only the GQA node rotates: elsewhere rotate here, as transformers would
        from .rotary import rotate  # noqa: PLC0415

        query, key = (rotate(x, table, ctx.rope, ctx.position_ids) for x in (query, key))
        table = None
    if kind == "ring":
        out, new_k, new_v = ring(query, key, value, past_k, past_v, ctx.position, scale, window, cap or None)
    elif kind == "sinks":
        from .sinks import sink_attention  # noqa: PLC0415

        out, new_k, new_v = sink_attention(query, key, value, past_k, past_v, ctx.position, scale, ctx.sinks,
                                           cap or None, ctx.rotate)
    elif kind == "gqa":
        q3 = query.transpose(1, 2).reshape(b, t, h * d)
        k3 = key.transpose(1, 2).reshape(b, t, kvh * d)
        v3 = value.transpose(1, 2).reshape(b, t, kvh * d)
        rope = () if table is None else (ctx.rope.cos[table], ctx.rope.sin[table])
        out3, new_k, new_v = _GroupQueryAttention.apply(q3, k3, v3, past_k, past_v, ctx.seqlens_k, ctx.total_length,
                                                        ctx.position, h, kvh, scale, window, cap, *rope)
        out = out3.view(b, t, h, d)
    else:
        out, new_k, new_v = reference(query, key, value, past_k, past_v, ctx.position, scale, window or None, cap or None)
    ctx.present[layer] = (new_k, new_v)
    return out, None


def _deferred_table(ctx: StepContext, query: torch.Tensor, key: torch.Tensor) -> int | None:
    """The RoPE table q and k still wait for (:mod:`.rotary`), or None when transformers rotated them."""
    from .rotary import tag_of  # noqa: PLC0415

    tq, tk = tag_of(query), tag_of(key)
    if tq is None and tk is None:
        return None
    if tq != tk or ctx.rope is None:
        from .rotary import NotDeferred  # noqa: PLC0415

        raise NotDeferred("RoPE deferred for one of q and k only: something between transformers' rotation and "
                           "its attention call changed them")
    ctx.rope.pending -= 1
    return int(tq)


def register() -> None:
    """Make :data:`IMPLEMENTATION` a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface  # noqa: PLC0415

    AttentionInterface.register(IMPLEMENTATION, kv_attention)
    try:  # the mask interface is keyed by the same name; our attention builds its own masks from positions
        from transformers.masking_utils import AttentionMaskInterface  # noqa: PLC0415

        AttentionMaskInterface.register(IMPLEMENTATION, lambda *a, **k: None)
    except ImportError:  # pragma: no cover - older transformers
        pass
