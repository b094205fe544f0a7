"""Growing-cache decoders (Optimum, transformers.js, onnx-community): ``past_key_values.{i}.key|value``
``[batch, kv_heads, past_sequence_length, head]`` in, ``present.{i}.*`` of ``past + time`` rows out,
``attention_mask [batch, past + time]``, usually ``position_ids``.

Wrapped into a fixed-capacity state (ping-pong, like ``export hf: --attention portable``): each step hands the
graph the first ``live = max(position)`` rows of the buffer as its past, a mask that lets each row see its own
``position`` past rows and the chunk (rows between a shorter row's end and ``live`` are padding, masked), and
``position_ids = position + arange(time)``; the chunk's new rows (the last ``time`` rows of ``present``) are
then scattered into a copy of the buffer at each row's own positions. A step so costs the batch's longest
context (the graph's attention) plus one copy of the capacity (the scatter), and rows at different positions
batch in one call. Conv/SSM states (``past_conv.{i}``) are plain ping-pong states.
"""
from __future__ import annotations

from typing import Any

from ..contract import BATCH, StateSpec
from ..errors import SpecError
from .beside import Beside
from .feeds import POSITION, PositionFeeds
from .graph import Surgery, dims, dtype
from .pairs import CachePair, fixed_state, kv_shape

_LAST = 2 ** 62  # "to the end" for Slice


def check_mask(s: Surgery, past_axis: Any, time_axis: Any) -> None:
    """The mask must be ``[batch, past + time]``: a mask over the chunk only or over the past only (a dim named
    like one of them), a fixed length or another rank cannot be fed from positions this way."""
    vi = s.inputs["attention_mask"]
    d = dims(vi)
    if len(d) != 2 or isinstance(d[1], int) or (d[1] is not None and d[1] in (past_axis, time_axis)):
        raise SpecError(f"input 'attention_mask': shape {[x or '?' for x in d]} is not [batch, past_sequence_length + "
                        "sequence_length]; adopt the file by hand with --state IN=OUT, or pass --convention genai "
                        "for a GroupQueryAttention file")


def rewrite(s: Surgery, feeds: PositionFeeds, pairs: list[CachePair], capacity: int | None,
            beside: Beside) -> tuple[list[StateSpec], dict[str, Any]]:
    """The states and the meta entries of the adopted file; see the module doc."""
    states: list[StateSpec] = []
    past_axis = None
    index: str | None = None  # [batch, 1, time, 1]: the chunk's absolute positions, shared by every layer
    for p in pairs:
        if p.kind == "state":
            states.append(fixed_state(p, s))
            continue
        assert capacity is not None  # the caller resolves it whenever there is an attention cache
        shape = kv_shape(p, s, capacity, beside)
        vin = s.inputs[p.input]
        past_axis = past_axis or dims(vin)[2]
        elem, batch = dtype(vin), dims(vin)[0] or "batch_size"
        # the graph reads the live rows of the state where it read its past
        live = s.op("Slice", [p.input, s.const("zero1", [0]), s.op("Reshape", [feeds.live, s.const("one_d", [1])],
                    "live_1d"), s.const("axis2", [2])], "past_live")
        s.rename_uses(p.input, live)
        s.reshape(vin, [batch, *shape])
        grown = f"{p.output}/grown"
        s.rename_output(p.output, grown)
        s.declare(p.output, elem, [batch, *shape], output=True)
        if index is None:
            rows = s.op("Reshape", [POSITION, s.const("b111", [-1, 1, 1, 1])], "position_4d")
            chunk = s.op("Range", [s.const("zero", 0), feeds.time, s.const("one", 1)], "chunk_rows")
            index = s.op("Add", [rows, s.op("Reshape", [chunk, s.const("11t1", [1, 1, -1, 1])], "chunk_4d")], "rows")
        new = s.op("Slice", [grown, s.op("Reshape", [feeds.live, s.const("one_d", [1])], "live_1d", after=True),
                             s.const("end", [_LAST]), s.const("axis2", [2])], "new_rows", after=True)
        where = s.op("Expand", [index, s.op("Shape", [new], "new_shape", after=True)], "rows_expanded", after=True)
        s.op("ScatterElements", [p.input, where, new], "write", after=True, out=p.output, axis=2)
        states.append(StateSpec(p.input, [BATCH, *shape], elem, output=p.output,
                                doc=f"attention {p.kind}s, one row per position (a capacity buffer; the graph sees "
                                    "the batch's live rows)"))
    if "attention_mask" in s.inputs:
        time_axis = dims(s.inputs["input_ids"])[1] if "input_ids" in s.inputs else None
        check_mask(s, past_axis, time_axis)
        elem = dtype(s.inputs["attention_mask"])
        s.replace_input("attention_mask")
        feeds.live_mask("attention_mask", elem)
    meta: dict[str, Any] = {}
    kv = [p.input for p in pairs if p.kind != "state"]
    if kv:
        meta["context_axes"] = {name: 2 for name in kv}
    return states, meta
