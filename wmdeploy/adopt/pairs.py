"""Which graph input is fed back from which output (the cache pairs of a decoder, by the exporters' names), and
the fixed shape each pair's state takes.

Every exporter names a cache input ``past...`` and its output ``present...`` with the rest of the name kept:
``past_key_values.{i}.key`` -> ``present.{i}.key`` (Optimum, transformers.js, GenAI), ``past.{i}.conv`` ->
``present.{i}.conv`` (GenAI's LFM2), ``past_conv.{i}`` / ``past_ssm.{i}`` / ``past_recurrent.{i}`` ->
``present_conv.{i}`` ... (transformers.js hybrids), ``past_key_values.{i}.conv_state`` -> ``present.{i}.conv_state``
(GenAI's Qwen3.5). A pair that cannot be matched is refused by name: guessing would feed one layer's memory
into another.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from ..contract import BATCH, StateSpec
from ..errors import SpecError
from .beside import Beside
from .graph import Surgery, dims, dtype

_KV = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_LAYER = re.compile(r"(\d+)")


@dataclass(frozen=True)
class CachePair:
    input: str
    output: str
    kind: str   # "key" | "value" (an attention cache: one row per position) | "state" (conv/SSM: fixed size)
    layer: int


def _candidates(name: str) -> list[str]:
    out = []
    if name.startswith("past_key_values"):
        out.append("present" + name[len("past_key_values"):])
    out.append("present" + name[len("past"):])
    return out


def is_cache(name: str) -> bool:
    return name.startswith("past")


def pair_caches(inputs: Iterable[str], outputs: Iterable[str], convention: str) -> list[CachePair]:
    """The cache pairs, attention caches first by layer, then the other states by layer."""
    outs = list(outputs)
    pairs: list[CachePair] = []
    for name in (n for n in inputs if is_cache(n)):
        match = next((c for c in _candidates(name) if c in outs), None)
        if match is None:
            raise SpecError(f"input '{name}': no output {' or '.join(repr(c) for c in _candidates(name))} to feed it "
                            f"back from (the {convention} convention pairs past* with present*); name the pairs with "
                            "--state IN=OUT, or pass --convention for another layout")
        kv = _KV.match(name)
        layer = int(kv.group(1)) if kv else int(m.group(1)) if (m := _LAYER.search(name)) else 0
        pairs.append(CachePair(name, match, kv.group(2) if kv else "state", layer))
    taken = {p.output for p in pairs}
    orphans = [o for o in outs if o.startswith("present") and o not in taken]
    if orphans:
        raise SpecError(f"output '{orphans[0]}': no past* input is fed back from it (the {convention} convention "
                        "pairs past* with present*); name the pairs with --state IN=OUT, or pass --convention")
    if not pairs:
        raise SpecError(f"the file has no past* cache inputs, so it follows no {convention} layout; name its state "
                        "pairs with --state IN=OUT")
    return sorted(pairs, key=lambda p: (p.kind == "state", p.layer, p.kind, p.input))


def fixed_state(p: CachePair, s: Surgery) -> StateSpec:
    """A conv/recurrent state: its shape is fixed apart from the batch on axis 0."""
    vin = s.inputs[p.input]
    d = dims(vin)
    if any(not isinstance(x, int) for x in d[1:]):
        raise SpecError(f"input '{p.input}': shape {[x or '?' for x in d]} has a dynamic axis besides the batch; a "
                        "conv/recurrent state must be fixed-size (adopt it by hand with --state IN=OUT)")
    return StateSpec(p.input, [BATCH, *d[1:]], dtype(vin), output=p.output, doc="conv/recurrent state (fed back)")


def kv_shape(p: CachePair, s: Surgery, capacity: int, beside: Beside) -> list[int]:
    """[kv_heads, capacity, head_size] of an attention cache (the head size from the files beside when the graph
    leaves it symbolic, as GenAI's ``kv_cache_dim`` does)."""
    d = dims(s.inputs[p.input])
    if len(d) != 4:
        raise SpecError(f"input '{p.input}': rank {len(d)}; an attention cache is [batch, kv_heads, length, head_size]")
    heads, head = d[1], d[3] if isinstance(d[3], int) else beside.head_size()
    if not isinstance(heads, int):
        raise SpecError(f"input '{p.input}': axis 1 (kv heads) is '{heads or '?'}' in the graph; expected a fixed int")
    if head is None:
        raise SpecError(f"input '{p.input}': axis 3 (head size) is '{d[3] or '?'}' and no genai_config.json or "
                        "config.json beside the file gives it (head_size / head_dim)")
    return [heads, capacity, int(head)]
