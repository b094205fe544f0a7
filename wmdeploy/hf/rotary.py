"""RoPE inside ``GroupQueryAttention`` (``do_rotary``): one node per layer instead of ~14 small ones.

transformers rotates queries and keys in its modeling file's ``apply_rotary_pos_emb`` (``x * cos +
rotate_half(x) * sin``) before the attention interface sees them; traced, that is two Slices, a Neg, a
Concat, two Muls and an Add for each of q and k, plus the shape arithmetic of the slices. At batch-1 decode
of a 4-bit LM each of those is a kernel launch as long as its arithmetic (``bench/bench_lm.py``).
ONNX Runtime's ``GroupQueryAttention`` rotates q and k itself from ``cos_cache``/``sin_cache`` tables
``[positions, head_dim / 2]`` at each row's position (from ``seqlens_k``), which is exactly where our rows
are: so, while the in-place form is traced, :func:`deferred` swaps the modeling file's function for one that
leaves q and k unrotated, tagged with the table that rotates them, and the attention node gets the tables.

It applies only where it is provably the same computation: the layer's ``cos``/``sin`` must equal, at the
traced positions, one of the tables computed from the model's own rotary modules over every position up to
``max_context`` (so RoPE types whose angle depends on the sequence length, and partial or interleaved
rotations, are rotated by transformers as before), and the modeling file's function must give what the
standard half rotation gives on those very tensors. The cache holds rotated keys either way, so the file's
states, snapshots and the torch reference are unchanged.
"""
from __future__ import annotations

import contextlib
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..errors import ExportError

#: RoPE types whose angles depend on the sequence length, not only on the position: never tabulated
_LENGTH_DEPENDENT = {"dynamic", "longrope"}
_TAG = "_wmdeploy_rope"


class NotDeferred(ExportError):
    """A deferred rotation did not reach an attention node unchanged: export again with transformers' RoPE.
    (An ExportError, so that ``torch_module.export_graph`` passes it through unwrapped.)"""


@dataclass
class RotaryTables:
    """cos/sin tables ``[max_context, head_dim / 2]`` of every rotary module of the model (and layer type)."""

    cos: list[torch.Tensor] = field(default_factory=list)
    sin: list[torch.Tensor] = field(default_factory=list)
    pending: int = 0  # rotations deferred and not yet taken by an attention node in this forward

    def match(self, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor) -> int | None:
        """Which table gives ``cos``/``sin`` [b, t, d] at ``position_ids`` [b, t]; None when none does."""
        half = cos.shape[-1] // 2
        if cos.dim() != 3 or cos.shape[-1] % 2 or not torch.equal(cos[..., :half], cos[..., half:]):
            return None
        for i, (c, s) in enumerate(zip(self.cos, self.sin)):
            if c.shape[-1] != half or int(position_ids.max()) >= c.shape[0]:
                continue
            if (torch.allclose(c[position_ids], cos[..., :half].float(), atol=1e-6)
                    and torch.allclose(s[position_ids], sin[..., :half].float(), atol=1e-6)):
                return i
        return None


def rope_kinds(config: Any) -> set[str]:
    """The RoPE types ``config`` names (one per layer type where it keeps them per layer type)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return {"default"}
    if rope and all(isinstance(v, dict) for v in rope.values()):  # per layer type
        return {v.get("rope_type", v.get("type", "default")) for v in rope.values()}
    return {rope.get("rope_type", rope.get("type", "default"))}


def tables(model: torch.nn.Module, max_context: int) -> RotaryTables | None:
    """The tables of ``model``'s rotary modules over positions ``0 .. max_context - 1``, or None when the model
    has none we can tabulate."""
    if rope_kinds(model.config) & _LENGTH_DEPENDENT:
        return None
    out = RotaryTables()
    layer_types = sorted(set(getattr(model.config, "layer_types", None) or [])) or [None]
    positions = torch.arange(max_context)[None, :]
    probe = torch.zeros(1, dtype=torch.float32)
    for module in model.modules():
        if not type(module).__name__.endswith("RotaryEmbedding") or not hasattr(module, "forward"):
            continue
        takes_type = "layer_type" in inspect.signature(module.forward).parameters
        for kind in (layer_types if takes_type else [None]):
            try:
                with torch.no_grad():
                    cos, sin = module(probe, positions, kind) if takes_type else module(probe, positions)
            except Exception:  # noqa: BLE001 - a layer type without RoPE, an unusual module: not a table
                continue
            half = cos.shape[-1] // 2
            out.cos.append(cos[0, :, :half].float().contiguous())
            out.sin.append(sin[0, :, :half].float().contiguous())
    return out if out.cos else None


def half_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, h, t, d] rotated by cos/sin [b, t, d / 2] (non-interleaved halves, transformers' rotate_half)."""
    half = x.shape[-1] // 2
    c, s = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def rotate(x: torch.Tensor, table: int, rope: RotaryTables, position_ids: torch.Tensor) -> torch.Tensor:
    """What transformers would have done to ``x`` [b, h, t, d] at ``position_ids`` [b, t] (eager and the
    torch reference of the attention node)."""
    return half_rotation(x, rope.cos[table][position_ids], rope.sin[table][position_ids])


def tag_of(x: torch.Tensor) -> int | None:
    return getattr(x, _TAG, None)


@contextlib.contextmanager
def deferred(model: torch.nn.Module, rope: RotaryTables, position_ids: Any) -> Iterator[None]:
    """While active, the modeling file's ``apply_rotary_pos_emb`` returns q and k unrotated and tagged with
    their table wherever :class:`RotaryTables` proves that table is the rotation; ``position_ids()`` gives the
    current forward's positions [b, t]. With ``rope`` None, nothing changes."""
    if rope is None:
        yield
        return
    modules = {sys.modules.get(type(m).__module__) for m in model.modules()}
    owners = [m for m in modules if m is not None and callable(getattr(m, "apply_rotary_pos_emb", None))]
    saved = {m: m.apply_rotary_pos_emb for m in owners}

    def wrap(original: Any) -> Any:
        def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                 *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            done = original(q, k, cos, sin, *args, **kwargs)
            pos = position_ids()
            if (args or set(kwargs) - {"unsqueeze_dim"} or kwargs.get("unsqueeze_dim", 1) != 1 or pos is None
                    or q.dim() != 4 or q.shape[-1] != cos.shape[-1] or tuple(cos.shape[:2]) != tuple(pos.shape)):
                return done
            table = rope.match(cos, sin, pos)
            if table is None:
                return done
            # the modeling file's rotation must be the half rotation on these very tensors
            if not (torch.allclose(done[0], rotate(q, table, rope, pos), atol=1e-5)
                    and torch.allclose(done[1], rotate(k, table, rope, pos), atol=1e-5)):
                return done
            q2, k2 = q.clone(), k.clone()  # fresh tensors: the tag must not outlive this call on a shared one
            setattr(q2, _TAG, table)
            setattr(k2, _TAG, table)
            rope.pending += 1
            return q2, k2

        return apply_rotary_pos_emb

    try:
        for m in owners:
            m.apply_rotary_pos_emb = wrap(saved[m])
        yield
    finally:
        for m, fn in saved.items():
            m.apply_rotary_pos_emb = fn

