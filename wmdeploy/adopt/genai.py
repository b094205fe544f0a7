"""ONNX Runtime GenAI builder output: ``GroupQueryAttention`` whose past and present share one buffer.

GenAI allocates each layer's K/V as one ``max_length`` buffer and binds it as both the node's past input and
its present output (``past_present_share_buffer``); the kernel writes only the chunk's rows and attends to each
row's first ``seqlens_k + 1`` (which the builder's mask subgraph computes from ``attention_mask``). That is
exactly our in-place state (``StateSpec.inplace``, what ``export hf:`` writes): the buffer becomes the state
with the context capacity on axis 2, the mask is computed from the per-row position (:mod:`.feeds`), and the
graph's attention is left as the builder made it. Conv states (LFM2's ``past.{i}.conv``) are ping-pong states.
"""
from __future__ import annotations

from typing import Any

from ..contract import BATCH, StateSpec
from ..errors import SpecError
from .beside import Beside
from .feeds import PositionFeeds
from .graph import Surgery, dims, dtype
from .pairs import CachePair, fixed_state, kv_shape

DOCS = {"key": "attention keys, one row per position (in place)", "value": "attention values, one row per position (in place)"}


def _gqa_nodes(s: Surgery) -> dict[str, tuple[Any, int]]:
    """past tensor name -> (its GroupQueryAttention node, 0 for key / 1 for value)."""
    out: dict[str, tuple[Any, int]] = {}
    for node in s.graph.node:
        if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft" and len(node.input) > 4:
            out[node.input[3]] = (node, 0)
            out[node.input[4]] = (node, 1)
    return out


def uses_gqa(s: Surgery) -> bool:
    """Whether some graph input is the past of a ``GroupQueryAttention`` node (what detection looks for)."""
    return any(name in s.inputs for name in _gqa_nodes(s))


def rewrite(s: Surgery, feeds: PositionFeeds, pairs: list[CachePair], capacity: int | None,
            beside: Beside) -> tuple[list[StateSpec], dict[str, Any]]:
    """The states and the meta entries of the adopted file; see the module doc."""
    gqa = _gqa_nodes(s)
    states: list[StateSpec] = []
    for p in pairs:
        if p.kind == "state":
            states.append(fixed_state(p, s))
            continue
        node, which = gqa.get(p.input, (None, 0))
        if node is None:
            raise SpecError(f"input '{p.input}': not the past of a GroupQueryAttention node, so it is no shared "
                            "GenAI buffer; pass --convention optimum for a growing cache")
        if node.output[1 + which] != p.output:
            raise SpecError(f"input '{p.input}': its GroupQueryAttention writes '{node.output[1 + which]}', not "
                            f"'{p.output}'; past and present must be one buffer (pass --convention optimum)")
        assert capacity is not None  # the caller resolves it whenever there is an attention cache
        shape = kv_shape(p, s, capacity, beside)
        batch = dims(s.inputs[p.input])[0] or "batch_size"
        s.reshape(s.inputs[p.input], [batch, *shape])
        s.reshape(s.outputs[p.output], [batch, *shape])
        states.append(StateSpec(p.input, [BATCH, *shape], dtype(s.inputs[p.input]), output=p.output,
                                doc=DOCS[p.kind], inplace=True))
    if "attention_mask" in s.inputs:
        vi = s.inputs["attention_mask"]
        if len(dims(vi)) != 2 or isinstance(dims(vi)[1], int):
            raise SpecError(f"input 'attention_mask': shape {[x or '?' for x in dims(vi)]} is not [batch, "
                            "total_sequence_length]; pass --convention optimum for a [batch, past + time] mask")
        s.replace_input("attention_mask")
        feeds.total_mask("attention_mask", dtype(vi))
    meta: dict[str, Any] = {}
    kv = [st.name for st in states if st.inplace]
    if kv:
        # ORT's GroupQueryAttention refuses a multi-token call of several rows with a past (as for export hf:)
        meta["prefill_batch"] = "fresh"
        meta["context_axes"] = {name: 2 for name in kv}
    return states, meta
