"""The non-Mamba hybrids with explicit states: LFM2, Qwen3-Next and RecurrentGemma.

The export traces the model once, at ``time = 3`` from position 0, and the graph must then be right for any
chunk length after any position (a prefill of 7 from 0, of 3 after 4, single tokens). transformers' mixers
branch in Python on ``seq_len == 1`` or on whether a state exists, and their multi-token paths loop over time
or over chunks, so here each recurrent mixer gets a second forward, taken only inside our explicit-cache
forward (the model's own forward is untouched for everything else, so the check still compares with
transformers' own code): it reads its held states from the :class:`~.attention.StepContext`, runs the
multi-token form starting from them (which is exact for one token too), and records the next states.

* **LFM2** (short causal convs + attention) needs nothing: its ``causal_conv1d_forward`` takes the cache's
  ``update_conv_state`` path for any chunk longer than one token, which prepends the held left context.
* **Qwen3-Next** (gated delta net + gated attention, MoE MLPs): :func:`gated_delta_rule` is the chunked form
  of the gated delta rule with no loop over time: the chunk is cut into blocks of :data:`DELTA_BLOCK`
  positions (padded in the graph), the UT transform inside a block by forward substitution (unrolled over the
  block; ONNX has no triangular solve, and the Neumann series overflows float32 on long chunks), and the state
  passed from block to block by a Hillis-Steele scan of each block's affine map ``S -> M S + B``. The MoE
  experts run transformers' ``batched_mm`` form (a gather of each token's experts) instead of the
  data-dependent loop over the experts that were hit.
* **RecurrentGemma** (RG-LRU blocks + local attention) keeps its states on the modules and returns no cache,
  so :func:`probe_recurrent_gemma` lays out its memory (``layout.probe`` calls it for this family). The block's
  conv reads its held ``conv1d_width - 1`` columns; the diagonal recurrence ``h_t = a_t h_(t-1) + x_t`` is a
  Hillis-Steele scan (``ceil(log2(capacity))`` shifted multiply-adds: products of decays in (0, 1], no
  exponent differences, stable), with the held state folded into the first step and the reset at position 0
  applied per row as transformers does.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import ExportError
from .layout import CacheLayout, CacheTensor

FAMILIES = ("lfm2", "qwen3_next", "recurrent_gemma")

#: the longest chunk the scans are built for when the layout has no KV buffer to read the capacity from
DEFAULT_SCAN_LENGTH = 8192
#: positions per block of the gated delta rule (transformers' chunk size)
DELTA_BLOCK = 64
_CAPACITY_ATTR = "_wmdeploy_capacity"
_PATCHED_ATTR = "_wmdeploy_explicit_forward"


# ---- shared ----------------------------------------------------------------------------------------------
def _context() -> Any:
    from . import attention  # noqa: PLC0415

    return getattr(attention._local, "ctx", None)


def _is_explicit(cache: Any) -> bool:
    from .cache import ExplicitCache  # noqa: PLC0415

    return isinstance(cache, ExplicitCache)


def _override(module: torch.nn.Module, explicit: Callable[..., Any], use: Callable[[tuple, dict], bool]) -> None:
    """Give ``module`` a forward that runs ``explicit(module, ...)`` when ``use(args, kwargs)`` holds (inside our
    explicit-cache forward) and its own forward otherwise. Idempotent."""
    if getattr(module, _PATCHED_ATTR, None) is not None:
        return
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if use(args, kwargs):
            return explicit(module, *args, **kwargs)
        return original(*args, **kwargs)

    setattr(module, _PATCHED_ATTR, explicit)
    module.forward = forward


def _cache_arg(args: tuple, kwargs: dict, position: int) -> Any:
    if "cache" in kwargs:
        return kwargs["cache"]
    return args[position] if len(args) > position else None


def _capacity(model: Any, layout: CacheLayout) -> int:
    for t in layout.tensors:
        if t.kind == "key":
            return int(t.shape[1])
    return int(getattr(model, _CAPACITY_ATTR, DEFAULT_SCAN_LENGTH))


def _doublings(length: int, at_least: int = 1) -> int:
    """The number of doublings that reach ``length``: 2 ** n >= length (and n >= ``at_least``)."""
    return max(at_least, math.ceil(math.log2(max(int(length), 1))))


def _require(layout: CacheLayout, family: str, kind: str, layers: list[int]) -> None:
    have = {t.layer for t in layout.tensors if t.kind == kind}
    missing = [i for i in layers if i not in have]
    if missing:
        raise ExportError(f"{family}: layers {missing} hold no {kind} state in the probed cache layout; "
                          "this transformers version lays out the cache differently from what wmdeploy supports")


def _causal_conv(conv: torch.nn.Conv1d, x: torch.Tensor, past: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv of ``x`` [b, c, t] after the held columns ``past`` [b, c, s] (s >= kernel - 1):
    returns (out [b, c, t], the next held columns)."""
    full = torch.cat([past, x.to(past.dtype)], dim=-1)
    held = full[..., -past.shape[-1]:]
    kernel = int(conv.weight.shape[-1])
    window = full[..., past.shape[-1] - (kernel - 1):] if past.shape[-1] > kernel - 1 else full
    out = F.conv1d(window.to(conv.weight.dtype), conv.weight, conv.bias, groups=int(conv.weight.shape[0]))
    return out[..., -x.shape[-1]:], held


# ---- LFM2 ------------------------------------------------------------------------------------------------
def _prepare_lfm2(model: Any, layout: CacheLayout) -> None:
    conv_layers = [i for i, kind in enumerate(model.config.layer_types) if kind == "conv"]
    _require(layout, "lfm2", "conv", conv_layers)


# ---- Qwen3-Next --------------------------------------------------------------------------------------------
def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _unit_lower_inverse(lower: torch.Tensor) -> torch.Tensor:
    """``(I + L)^-1`` for ``L`` [..., c, c] strictly lower triangular, by forward substitution over the c rows
    (c static: unrolled; stable, unlike the Neumann series, whose terms grow like binomials)."""
    c = int(lower.shape[-1])
    eye = torch.eye(c, dtype=lower.dtype, device=lower.device)
    inv = eye.expand_as(lower)
    for i in range(1, c):
        # row i of the inverse: e_i - sum_(j<i) L_ij inv_j (rows j < i are final, L_ij = 0 for j >= i)
        inv = inv - eye[:, i:i + 1] * torch.matmul(lower[..., i:i + 1, :], inv)
    return inv


def gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, state: torch.Tensor, max_length: int, block: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over one chunk of any length up to ``max_length``, from ``state``, as transformers'
    ``torch_chunk_gated_delta_rule`` computes it (l2-normed q/k, q scaled by ``1/sqrt(dk)``), with no Python loop
    over time or over blocks.

    The chunk is cut into blocks of ``block`` positions (right-padded with no-op positions: beta 0, decay 0).
    Within a block, the UT transform of the chunked form (forward substitution, unrolled over the block). Across
    blocks, each block maps the state it receives affinely, ``S -> M S + B``; the states every block receives
    are an inclusive Hillis-Steele scan of these maps over the blocks (``ceil(log2(max_length / block))``
    compositions, products of the near-contractive delta-rule transitions).

    query/key [b, t, hk, dk], value [b, t, hv, dv], g/beta [b, t, hv], state [b, hv, dk, dv] ->
    (out [b, t, hv, dv] in the input dtype, next state [b, hv, dk, dv] float32). ``block``: default
    :data:`DELTA_BLOCK`.
    """
    block = int(block or DELTA_BLOCK)
    dtype = query.dtype
    hk, hv, dk = int(key.shape[2]), int(value.shape[2]), int(key.shape[3])
    if hk != hv:
        query = query.repeat_interleave(hv // hk, dim=2)
        key = key.repeat_interleave(hv // hk, dim=2)
    q, k, v, beta, g = (x.transpose(1, 2).to(torch.float32) for x in (query, key, value, beta, g))
    q = _l2norm(q) * dk ** -0.5
    k = _l2norm(k)
    s0 = state.to(torch.float32)
    b, h, t = k.shape[0], k.shape[1], k.shape[2]
    dv = int(v.shape[-1])
    pad = (-t) % block
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    n = (t + pad) // block
    q, k, v = (x.reshape(b, h, n, block, x.shape[-1]) for x in (q, k, v))
    beta, g = (x.reshape(b, h, n, block) for x in (beta, g))
    lower = torch.ones(block, block, device=k.device).tril()          # j <= i
    strict = torch.ones(block, block, device=k.device).tril(-1)       # j < i
    cum = g.cumsum(dim=-1)                                            # log of the decay since the block start
    decay = torch.exp((cum[..., :, None] - cum[..., None, :]) * lower) * lower
    k_beta = k * beta[..., None]
    inv = _unit_lower_inverse(torch.matmul(k_beta, k.transpose(-1, -2)) * decay * strict)
    u = torch.matmul(inv, v * beta[..., None])                        # [b, h, n, c, dv]
    w = torch.matmul(inv, k_beta * cum.exp()[..., None])              # [b, h, n, c, dk]
    intra = torch.matmul(q, k.transpose(-1, -2)) * decay
    last = cum[..., -1:]                                              # [b, h, n, 1]
    k_end = (k * (last - cum).exp()[..., None]).transpose(-1, -2)      # [b, h, n, dk, c]
    eye = torch.eye(dk, device=k.device)
    # block j: S -> (I + D_j) S + B_j, D_j = (gamma_j - 1) I - k_end W, B_j = k_end U; S0 folded into block 0
    d = (last.exp()[..., None] - 1.0) * eye - torch.matmul(k_end, w)
    bias = torch.matmul(k_end, u)
    first = bias[:, :, :1] + s0[:, :, None] + torch.matmul(d[:, :, :1], s0[:, :, None])
    bias = torch.cat([first, bias[:, :, 1:]], dim=2)
    for j in range(_doublings(-(-max_length // block), at_least=0)):
        shift = 2 ** j
        d_prev = F.pad(d, (0, 0, 0, 0, shift, 0))[:, :, :n]
        b_prev = F.pad(bias, (0, 0, 0, 0, shift, 0))[:, :, :n]
        bias = bias + b_prev + torch.matmul(d, b_prev)                # later map after the earlier one
        d = d + d_prev + torch.matmul(d, d_prev)
    received = torch.cat([s0[:, :, None], bias[:, :, :-1]], dim=2)    # the state each block starts from
    out = torch.matmul(q * cum.exp()[..., None], received) + torch.matmul(intra, u - torch.matmul(w, received))
    out = out.reshape(b, h, n * block, dv)[:, :, :t]
    return out.transpose(1, 2).to(dtype), bias[:, :, -1]


def _gated_delta_net_forward(max_length: int) -> Callable[..., torch.Tensor]:
    from transformers.activations import ACT2FN  # noqa: PLC0415

    def forward(mod: Any, hidden_states: torch.Tensor, cache: Any = None, attention_mask: Any = None,
                **kwargs: Any) -> torch.Tensor:
        ctx, layer = cache.ctx, int(mod.layer_idx)
        qkvz = mod.in_proj_qkvz(hidden_states)
        ba = mod.in_proj_ba(hidden_states)
        query, key, value, z, b, a = mod.fix_query_key_value_ordering(qkvz, ba)
        query, key, value = (x.reshape(x.shape[0], x.shape[1], -1) for x in (query, key, value))
        mixed = torch.cat((query, key, value), dim=-1).transpose(1, 2)
        mixed, held = _causal_conv(mod.conv1d, mixed, ctx.conv[(layer, 0)])
        ctx.conv_out[(layer, 0)] = held
        mixed = ACT2FN[mod.activation](mixed).to(hidden_states.dtype).transpose(1, 2)
        query, key, value = torch.split(mixed, [mod.key_dim, mod.key_dim, mod.value_dim], dim=-1)
        query = query.reshape(query.shape[0], query.shape[1], -1, mod.head_k_dim)
        key = key.reshape(key.shape[0], key.shape[1], -1, mod.head_k_dim)
        value = value.reshape(value.shape[0], value.shape[1], -1, mod.head_v_dim)
        beta = b.sigmoid()
        g = -mod.A_log.float().exp() * F.softplus(a.float() + mod.dt_bias)
        out, state = gated_delta_rule(query, key, value, g, beta, ctx.recurrent[(layer, 0)], max_length)
        ctx.recurrent_out[(layer, 0)] = state
        z_shape = z.shape
        out = mod.norm(out.reshape(-1, out.shape[-1]), z.reshape(-1, z.shape[-1]))
        out = out.reshape(z_shape).reshape(z_shape[0], z_shape[1], -1)
        return mod.out_proj(out)

    return forward


def _prepare_qwen3_next(model: Any, layout: CacheLayout) -> None:
    from transformers.models.qwen3_next import modeling_qwen3_next as qn  # noqa: PLC0415

    linear_layers = [i for i, kind in enumerate(model.config.layer_types) if kind == "linear_attention"]
    _require(layout, "qwen3_next", "conv", linear_layers)
    _require(layout, "qwen3_next", "recurrent", linear_layers)
    explicit = _gated_delta_net_forward(_capacity(model, layout))
    experts_forward = None
    for module in model.modules():
        if isinstance(module, qn.Qwen3NextGatedDeltaNet):
            _override(module, explicit, lambda a, k: _is_explicit(_cache_arg(a, k, 1)))
        elif isinstance(module, qn.Qwen3NextExperts):
            if experts_forward is None:
                try:
                    from transformers.integrations.moe import batched_mm_experts_forward  # noqa: PLC0415
                except ImportError:
                    raise ExportError("qwen3_next: this transformers has no batched_mm experts forward "
                                      "(transformers.integrations.moe) for a loop-free MoE graph") from None
                experts_forward = batched_mm_experts_forward
            _override(module, experts_forward, lambda a, k: _context() is not None)


# ---- RecurrentGemma ------------------------------------------------------------------------------------------
def _recurrent_blocks(model: Any) -> list[tuple[int, Any]]:
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise ExportError("recurrent_gemma: the model has no decoder layers (model.model.layers)")
    return [(i, layer.temporal_block) for i, layer in enumerate(layers)
            if hasattr(layer.temporal_block, "rg_lru")]


def probe_recurrent_gemma(model: Any, capacity: int) -> CacheLayout:
    """RecurrentGemma's memory: per recurrent block a conv state ``[lru_width, conv1d_width - 1]`` and an RG-LRU
    state ``[lru_width]`` (float32, as transformers keeps it); per local-attention block keys and values
    ``[kv_heads, capacity, head_dim]`` (sliding). Read off one two-token forward with the model's own states
    (kept on its modules, which are reset afterwards) and a ``DynamicCache`` for the attention blocks."""
    from transformers import DynamicCache  # noqa: PLC0415

    from .layout import _dtype  # noqa: PLC0415

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2]]), use_cache=True, cache=cache)
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise ExportError("recurrent_gemma: the model has no decoder layers (model.model.layers)")
    tensors: list[CacheTensor] = []
    sliding, linear = [], []
    for i, layer in enumerate(layers):
        block = layer.temporal_block
        if hasattr(block, "rg_lru"):
            conv, rec = getattr(block, "conv1d_state", None), getattr(block.rg_lru, "recurrent_states", None)
            if not isinstance(conv, torch.Tensor) or not isinstance(rec, torch.Tensor) or conv.shape[-1] < 1:
                raise ExportError(f"recurrent_gemma layer {i}: its recurrent block kept no conv/RG-LRU state after a "
                                  "cached forward (conv1d_width 1 or a changed transformers); not supported")
            tensors.append(CacheTensor("conv", i, 0, tuple(int(s) for s in conv.shape[1:]),
                                       _dtype(conv, f"recurrent_gemma layer {i}")))
            tensors.append(CacheTensor("recurrent", i, 0, tuple(int(s) for s in rec.shape[1:]),
                                       _dtype(rec, f"recurrent_gemma layer {i}")))
            block.conv1d_state = None
            block.rg_lru.recurrent_states = None
            sliding.append(False)
            linear.append(True)
        else:
            held = cache.layers[i] if i < len(cache.layers) else None
            keys = getattr(held, "keys", None)
            if not isinstance(keys, torch.Tensor) or keys.ndim != 4 or not keys.numel():
                raise ExportError(f"recurrent_gemma layer {i}: its attention block wrote no keys/values to the cache")
            kvh, d = int(keys.shape[1]), int(keys.shape[3])
            dtype = _dtype(keys, f"recurrent_gemma layer {i}")
            tensors.append(CacheTensor("key", i, 0, (kvh, capacity, d), dtype))
            tensors.append(CacheTensor("value", i, 0, (kvh, capacity, d), dtype))
            sliding.append(True)
            linear.append(False)
    setattr(model, _CAPACITY_ATTR, int(capacity))
    return CacheLayout(tuple(tensors), len(layers), tuple(sliding), tuple(linear))


def linear_scan(a: torch.Tensor, x: torch.Tensor, doublings: int) -> torch.Tensor:
    """``h_t = a_t h_(t-1) + x_t`` from ``h_(-1) = 0`` along axis 1 (a, x [b, t, ...]): a Hillis-Steele scan,
    exact for ``t <= 2 ** doublings``."""
    t = x.shape[1]
    pad = [0, 0] * (x.ndim - 2)
    for j in range(doublings):
        shift = 2 ** j
        x = x + a * F.pad(x, pad + [shift, 0], value=0.0)[:, :t]
        a = a * F.pad(a, pad + [shift, 0], value=1.0)[:, :t]
    return x


def _rg_lru(lru: Any, activations: torch.Tensor, position_ids: torch.Tensor, state: torch.Tensor, doublings: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``RecurrentGemmaRglru.forward`` from the held ``state`` [b, lru] without a loop over time."""
    b, t, width = activations.shape
    heads, block = int(lru.num_attention_heads), int(lru.block_width)
    reset = position_ids[:, :, None] == 0
    act = activations.reshape(b * t, heads, block).permute(1, 0, 2)
    res = torch.baddbmm(lru.input_gate_bias[:, None, :], act, lru.input_gate_weight)
    input_gate = torch.sigmoid(res.transpose(0, 1).reshape(b, t, width))
    res = torch.baddbmm(lru.recurrent_gate_bias[:, None, :], act, lru.recurrent_gate_weight)
    recurrent_gate = torch.sigmoid(res.transpose(0, 1).reshape(b, t, width))
    log_a = -8.0 * recurrent_gate * F.softplus(lru.recurrent_param)
    a = torch.exp(log_a)
    a_square = torch.exp(2 * log_a)
    multiplier = torch.sqrt(1 - a_square)
    multiplier = reset + ~reset * multiplier
    x = (activations * input_gate) * multiplier.type(activations.dtype)
    a = (a * ~reset).to(torch.float32)
    x = x.to(torch.float32)
    # the held state enters through the first step: x_0 + a_0 * h
    x = torch.cat([x[:, :1] + a[:, :1] * state.to(torch.float32)[:, None], x[:, 1:]], dim=1)
    h = linear_scan(a, x, doublings)
    return h.to(activations.dtype), h[:, -1]


def _recurrent_block_forward(layer: int, doublings: int) -> Callable[..., Any]:
    def forward(block: Any, input_states: torch.Tensor, position_ids: torch.Tensor, attention_mask: Any = None,
                use_cache: bool = True, cache: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        ctx = cache.ctx
        y = block.act_fn(block.linear_y(input_states))
        x = block.linear_x(input_states).transpose(1, 2)
        x, held = _causal_conv(block.conv_1d, x, ctx.conv[(layer, 0)])
        ctx.conv_out[(layer, 0)] = held
        x, state = _rg_lru(block.rg_lru, x.transpose(1, 2), position_ids, ctx.recurrent[(layer, 0)], doublings)
        ctx.recurrent_out[(layer, 0)] = state
        return block.linear_out(x * y), None

    return forward


def _prepare_recurrent_gemma(model: Any, layout: CacheLayout) -> None:
    blocks = _recurrent_blocks(model)
    _require(layout, "recurrent_gemma", "conv", [i for i, _ in blocks])
    _require(layout, "recurrent_gemma", "recurrent", [i for i, _ in blocks])
    shapes = {(t.kind, t.layer): t.shape for t in layout.tensors}
    doublings = _doublings(_capacity(model, layout))
    for i, block in blocks:
        kernel = int(block.conv_1d.weight.shape[-1])
        if shapes[("conv", i)][-1] < kernel - 1:
            raise ExportError(f"recurrent_gemma layer {i}: conv state of {shapes[('conv', i)][-1]} columns for a "
                              f"kernel of {kernel}")
        _override(block, _recurrent_block_forward(i, doublings), lambda a, k: _is_explicit(k.get("cache")))


# ---- entry point ---------------------------------------------------------------------------------------------
def prepare_hybrid(model: Any, family: str, layout: CacheLayout) -> dict[str, Any]:
    """Make ``model``'s recurrent mixers (``family`` in :data:`FAMILIES`) run on the explicit states; see the
    module doc. Returns extra forward keyword arguments (none)."""
    if family == "lfm2":
        _prepare_lfm2(model, layout)
    elif family == "qwen3_next":
        _prepare_qwen3_next(model, layout)
    elif family == "recurrent_gemma":
        _prepare_recurrent_gemma(model, layout)
    else:
        raise ExportError(f"{family}: not a hybrid wmdeploy prepares here (supported: {', '.join(FAMILIES)})")
    return {}


__all__ = ["prepare_hybrid", "probe_recurrent_gemma", "gated_delta_rule", "linear_scan", "FAMILIES"]
