"""Mamba-family mixers with explicit states: Mamba, FalconMamba (selective scan, per-channel ``A``), Mamba2 and
the Mamba2-mixer hybrids Bamba and GraniteMoeHybrid (SSD, per-head scalar ``A``).

transformers' mixers reach their states through two module-level functions of their modeling file: the causal
conv (``causal_conv1d_forward``) and the scan (``mamba_scan_forward`` / ``mamba2_scan_forward``). Neither is
usable for an explicit-state export as it stands: the single-token paths write the states in place (``copy_``
into what would be a graph input), Mamba's multi-token scan ignores the held state (the TODO in its code), and
the paths branch on the chunk length in Python, so a trace at one length would be wrong at another.

:func:`prepare_ssm` therefore replaces, for the explicit cache only, those two functions with the ones below:

* the conv prepends the held left context (``ExplicitCache.update_conv_state``) and convolves without padding,
  keeping the outputs of this chunk's own columns (a constant offset, so the same graph serves any length);
* the scan is the exact within-chunk quadratic ("attention-like") form of the recurrence: with the log decays
  ``a_r = dt_r A`` (``<= 0``) and ``S(t, s) = sum_{s<r<=t} a_r``, ``h_t = exp(S(t, -1)) h_0 + sum_{s<=t}
  exp(S(t, s)) dt_s B_s x_s`` and ``y_t = C_t h_t + D x_t``. ``S`` is a masked cumulative sum of the terms
  themselves (``-inf`` for ``s > t`` before the exponential, so no decay exceeds 1), not a difference of
  running sums, whose rounding grows with the chunk and with ``|dt A|``. The held state ``h_0`` comes from the
  cache and the chunk's last state is recorded as the next one. No loop over time: the graph is the same for a
  prefill of 7 and a single token.
* GraniteMoeHybrid's MoE experts run transformers' loop-free ``batched_mm`` form under the explicit forward.

Each call that is handed anything other than our :class:`~.cache.ExplicitCache` (transformers' own generate and
forward, the check's reference) goes to the original function unchanged, and the mixers drop the wrapper's dummy
4-D attention mask (there is no padding inside a stream) only under the explicit cache.

Cost: the quadratic form holds ``[batch, channels, time, time, state]`` (Mamba) or ``[batch, heads, time, time]``
(Mamba2) intermediates per layer, which is nothing for decode steps and small prefill chunks; very long prefill
chunks of Mamba-1 models are better split into chunks by the caller.
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import ExportError
from .layout import CacheLayout

#: kind of mixer per family: "mamba" (selective scan, A [channels, state]) or "mamba2" (SSD, A [heads])
FAMILY_KIND = {"mamba": "mamba", "falcon_mamba": "mamba", "mamba2": "mamba2", "bamba": "mamba2",
               "granitemoehybrid": "mamba2"}
_CONV_FN = "causal_conv1d_forward"
_SCAN_FN = {"mamba": "mamba_scan_forward", "mamba2": "mamba2_scan_forward"}
_MARK = "_wmdeploy_explicit"


def _is_explicit(cache: Any) -> bool:
    from .cache import ExplicitCache  # noqa: PLC0415

    return isinstance(cache, ExplicitCache)


# ---- the explicit-state kernels ------------------------------------------------------------------------------
def explicit_conv(conv1d: torch.nn.Conv1d, hidden_states: torch.Tensor, cache: Any, layer_idx: int,
                  activation: str | None = None, state_idx: int = 0, **kwargs: Any) -> torch.Tensor:
    """Depthwise causal conv of ``hidden_states`` [b, channels, t] after the held left context."""
    from transformers.activations import ACT2FN  # noqa: PLC0415

    kernel = int(conv1d.kernel_size[0])
    held = int(cache.get_conv_state(layer_idx, state_idx).shape[-1])  # a constant of the layout (>= kernel - 1)
    full = cache.update_conv_state(hidden_states, layer_idx, state_idx=state_idx, conv_kernel_size=kernel)
    out = F.conv1d(full.to(conv1d.weight.dtype), conv1d.weight, conv1d.bias, groups=int(conv1d.weight.shape[0]))
    out = out[..., held - kernel + 1:]  # [b, channels, t]: the outputs at this chunk's columns
    if activation is not None:
        out = ACT2FN[activation](out)
    return out.to(hidden_states.dtype)


def _segment_sums(a: torch.Tensor) -> torch.Tensor:
    """a [..., t] (per-step log decays) -> [..., t, s]: ``sum_{s < r <= t} a_r`` where ``s <= t``, ``-inf`` above.

    Summed term by term (a masked cumulative sum), not as a difference of two running sums: those grow with the
    chunk (and with large ``dt * A``) until their rounding swamps the short-range decays that matter most."""
    steps = torch.arange(a.shape[-1], device=a.device)
    after = steps[:, None] > steps[None, :]                                 # [r, s]: r > s
    terms = torch.where(after, a[..., :, None], torch.zeros_like(a)[..., :, None])  # [..., r, s]
    sums = torch.cumsum(terms, dim=-2)                                      # [..., t, s]
    causal = steps[:, None] >= steps[None, :]
    return torch.where(causal, sums, torch.full_like(sums, float("-inf")))


def explicit_mamba_scan(module: torch.nn.Module, hidden_states: torch.Tensor, time_step: torch.Tensor,
                        B: torch.Tensor, C: torch.Tensor, gate: torch.Tensor, cache: Any, **kwargs: Any
                        ) -> torch.Tensor:
    """Mamba's selective scan from the held state: x/time_step/gate [b, d, t], B/C [b, t, n] -> [b, d, t]."""
    layer = int(module.layer_idx)
    h0 = cache.get_recurrent_state(layer, 0).float()                       # [b, d, n]
    A = -torch.exp(module.A_log.float())                                    # [d, n]
    dt = time_step.float()
    if module.dt_proj.bias is not None:
        dt = dt + module.dt_proj.bias.float()[:, None]
    dt = F.softplus(dt)                                                     # [b, d, t]
    x = hidden_states.float()
    Bf, Cf = B.float(), C.float()                                           # [b, t, n]
    a = dt[:, :, None, :] * A[None, :, :, None]                             # [b, d, n, t]
    decay = torch.exp(_segment_sums(a))                                     # [b, d, n, t, s]
    u = dt * x                                                              # [b, d, s]
    cb = (Cf[:, :, None, :] * Bf[:, None, :, :]).permute(0, 3, 1, 2)        # [b, n, t, s]
    weights = (decay * cb[:, None]).sum(2)                                  # [b, d, t, s]
    y = (weights * u[:, :, None, :]).sum(-1)                                # [b, d, t]
    from_start = torch.exp(torch.cumsum(a, dim=-1))                         # [b, d, n, t]
    y = y + (from_start * h0[..., None] * Cf.transpose(1, 2)[:, None]).sum(2)
    to_end = decay[..., -1, :]                                              # [b, d, n, s]
    h_new = from_start[..., -1] * h0 + (to_end * u[:, :, None, :] * Bf.transpose(1, 2)[:, None]).sum(-1)
    cache.update_recurrent_state(h_new.to(h0.dtype), layer)
    y = y + x * module.D.float()[None, :, None]
    y = y * F.silu(gate.float())
    return y.to(hidden_states.dtype)


def _per_head(t: torch.Tensor, groups: int, heads: int, size: int) -> torch.Tensor:
    """[b, t, groups * size] -> [b, heads, t, size] (each group shared by heads // groups heads)."""
    # views with explicit sizes, not unflatten/flatten: the exporter writes those as shape slices whose rank ORT's
    # symbolic shape inference cannot tell, and then static_shapes can fold nothing in the whole file
    b, n = t.shape[0], t.shape[1]
    g = t.float().view(b, n, groups, size)                                 # [b, t, g, n]
    if heads != groups:
        g = g[:, :, :, None, :].expand(-1, -1, -1, heads // groups, -1).reshape(b, n, heads, size)
    return g.transpose(1, 2)


def explicit_mamba2_scan(module: torch.nn.Module, hidden_states: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                         dt: torch.Tensor, cache: Any, **kwargs: Any) -> torch.Tensor:
    """Mamba2's SSD scan from the held state: x [b, t, h*p], B/C [b, t, g*n], dt [b, t, h] -> [b, t, h*p]."""
    layer = int(module.layer_idx)
    heads, head_dim = int(module.num_heads), int(module.head_dim)
    groups, size = int(module.n_groups), int(module.ssm_state_size)
    h0 = cache.get_recurrent_state(layer, 0).float()                        # [b, h, p, n]
    A = -torch.exp(module.A_log.float())                                    # [h]
    step = F.softplus(dt.float() + module.dt_bias.float())                  # [b, t, h]
    low, high = (float(v) for v in getattr(module, "time_step_limit", (0.0, float("inf"))))
    if low > 0.0 or high != float("inf"):
        step = torch.clamp(step, min=low, max=high)
    b, t = hidden_states.shape[0], hidden_states.shape[1]
    x = hidden_states.float().view(b, t, heads, head_dim)                   # [b, t, h, p] (see _per_head)
    Bh, Ch = _per_head(B, groups, heads, size), _per_head(C, groups, heads, size)  # [b, h, t, n]
    a = (step * A).transpose(1, 2)                                          # [b, h, t]
    decay = torch.exp(_segment_sums(a))                                     # [b, h, t, s]
    u = (x * step[..., None]).transpose(1, 2)                              # [b, h, s, p]
    scores = torch.matmul(Ch, Bh.transpose(-1, -2)) * decay                 # [b, h, t, s]
    y = torch.matmul(scores, u)                                             # [b, h, t, p]
    from_start = torch.exp(torch.cumsum(a, dim=-1))                         # [b, h, t]
    y = y + from_start[..., None] * torch.matmul(Ch, h0.transpose(-1, -2))
    to_end = decay[:, :, -1, :, None]                                       # [b, h, s, 1]
    h_new = from_start[:, :, -1, None, None] * h0 + torch.matmul((u * to_end).transpose(-1, -2), Bh)  # [b, h, p, n]
    cache.update_recurrent_state(h_new.to(h0.dtype), layer)
    y = y.transpose(1, 2) + x * module.D.float()[:, None]                   # [b, t, h, p]
    return y.reshape(b, t, heads * head_dim).to(hidden_states.dtype)


_OURS: dict[str, Callable[..., torch.Tensor]] = {_CONV_FN: explicit_conv, _SCAN_FN["mamba"]: explicit_mamba_scan,
                                                 _SCAN_FN["mamba2"]: explicit_mamba2_scan}


# ---- installing them ------------------------------------------------------------------------------------------
def _dispatching(original: Callable[..., Any], ours: Callable[..., Any]) -> Callable[..., Any]:
    """``original`` for every cache but ours; ``ours`` when one of the arguments is the explicit cache.

    (``original`` may be a plain function or, with the ``kernels`` package installed, the ``nn.Module`` that
    ``use_kernel_forward_from_hub`` makes of it; either is called as it was.)"""

    def call(*args: Any, **kwargs: Any) -> Any:
        if any(_is_explicit(a) for a in (*args, *kwargs.values())):
            return ours(*args, **kwargs)
        return original(*args, **kwargs)

    call.__name__ = call.__qualname__ = f"wmdeploy_{ours.__name__}"
    call.__doc__ = ours.__doc__
    setattr(call, _MARK, original)
    return call


def _patch_module(module_name: str, kind: str, family: str) -> None:
    modeling = sys.modules.get(module_name)
    for name in (_CONV_FN, _SCAN_FN[kind]):
        current = getattr(modeling, name, None) if modeling is not None else None
        if current is None:
            raise ExportError(f"{family}: {module_name} has no {name} (this transformers' mixer is not supported; "
                              "the conv and scan must be module-level functions)")
        if not hasattr(current, _MARK):
            setattr(modeling, name, _dispatching(current, _OURS[name]))


def _wrap_mixer_forward(mixer: torch.nn.Module) -> None:
    """Under the explicit cache, the mixer sees no attention mask (the wrapper's is a dummy 4-D one)."""
    if hasattr(mixer.forward, _MARK):
        return
    original = mixer.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("cache", kwargs.get("cache_params"))
        if cache is None and len(args) > 1:
            cache = args[1]
        if _is_explicit(cache):
            if len(args) > 2:
                args = args[:2]
            kwargs["attention_mask"] = None
        return original(*args, **kwargs)

    setattr(forward, _MARK, original)
    mixer.forward = forward


def _in_explicit_forward() -> bool:
    from . import attention  # noqa: PLC0415

    return getattr(attention._local, "ctx", None) is not None


def _wrap_experts(experts: torch.nn.Module, family: str) -> None:
    """MoE experts (GraniteMoeHybrid) run transformers' ``batched_mm`` form under the explicit-state forward: a
    gather of each token's experts, where the default forms loop over the experts that were hit (a trace would
    keep the experts of the trace's tokens) or count tokens with ``histc`` (no ONNX op)."""
    if hasattr(experts.forward, _MARK):
        return
    try:
        from transformers.integrations.moe import batched_mm_experts_forward  # noqa: PLC0415
    except ImportError:
        raise ExportError(f"{family}: this transformers has no batched_mm experts forward "
                          "(transformers.integrations.moe) for a loop-free MoE graph") from None
    original = experts.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if _in_explicit_forward():
            return batched_mm_experts_forward(experts, *args, **kwargs)
        return original(*args, **kwargs)

    setattr(forward, _MARK, original)
    experts.forward = forward


def _mixers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        if all(hasattr(module, a) for a in ("A_log", "conv1d", "in_proj", "out_proj", "layer_idx", "D")):
            found[int(module.layer_idx)] = module
    return found


def prepare_ssm(model: Any, family: str, layout: CacheLayout) -> dict[str, Any]:
    """Route ``model``'s Mamba/Mamba2 mixers through the explicit-state conv and scan (see the module doc)."""
    kind = FAMILY_KIND.get(family)
    if kind is None:
        raise ExportError(f"{family}: not a Mamba-mixer family (known: {', '.join(FAMILY_KIND)})")
    mixers = _mixers(model)
    states: dict[int, dict[str, Any]] = {}
    for t in layout.tensors:
        if t.kind in ("conv", "recurrent"):
            if t.index != 0:
                raise ExportError(f"{family} layer {t.layer}: {t.kind} state {t.index}; Mamba mixers hold one of each")
            states.setdefault(t.layer, {})[t.kind] = t
    if not states:
        raise ExportError(f"{family}: the model's cache holds no conv/recurrent states; nothing to make explicit")
    for layer, held in sorted(states.items()):
        mixer = mixers.get(layer)
        if mixer is None:
            raise ExportError(f"{family} layer {layer}: holds SSM states but no Mamba mixer with layer_idx {layer} "
                              "was found in the model")
        if set(held) != {"conv", "recurrent"}:
            raise ExportError(f"{family} layer {layer}: expected a conv and a recurrent state, the cache holds "
                              f"{sorted(held)}")
        is_mamba2 = mixer.A_log.ndim == 1
        if is_mamba2 != (kind == "mamba2"):
            raise ExportError(f"{family} layer {layer}: {type(mixer).__name__} has A_log of shape "
                              f"{tuple(mixer.A_log.shape)}, not what a {kind} mixer holds")
        kernel, channels = int(mixer.conv1d.kernel_size[0]), int(mixer.conv1d.in_channels)
        conv_shape = held["conv"].shape
        if len(conv_shape) != 2 or conv_shape[0] != channels or conv_shape[1] < kernel - 1:
            raise ExportError(f"{family} layer {layer}: conv state {conv_shape}; "
                              f"expected ({channels}, >= {kernel - 1})")
        if kind == "mamba":
            want = tuple(int(s) for s in mixer.A_log.shape)
        else:
            want = (int(mixer.num_heads), int(mixer.head_dim), int(mixer.ssm_state_size))
        if tuple(held["recurrent"].shape) != want:
            raise ExportError(f"{family} layer {layer}: recurrent state {held['recurrent'].shape}; expected {want}")
        _patch_module(type(mixer).__module__, kind, family)
        _wrap_mixer_forward(mixer)
    for module in model.modules():
        # experts classes under transformers' use_experts_implementation (what batched_mm reads is set there)
        if all(hasattr(module, a) for a in ("num_experts", "down_proj", "has_gate", "is_transposed")):
            _wrap_experts(module, family)
    return {}


__all__ = ["prepare_ssm", "explicit_conv", "explicit_mamba_scan", "explicit_mamba2_scan", "FAMILY_KIND"]
