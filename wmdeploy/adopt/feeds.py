"""What the exporters' own runtimes feed beside the tokens, computed inside the adopted graph from the per-row
``position`` state, so that the runtime feeds ``tokens`` only (as for our ``export hf:`` files) and rows at
different positions step in one engine call.

With ``end = position + time`` per row:

* ``position_ids [batch, time]`` = ``position + arange(time)`` (absolute positions: RoPE / learned embeddings);
* GenAI's ``attention_mask [batch, total]`` (``total = max(end)``): 1 for the row's ``end`` first slots; the
  builder's own mask subgraph turns it into ``seqlens_k = end - 1`` and ``total_sequence_length = max(end)``;
* Optimum's ``attention_mask [batch, live + time]`` (``live = max(position)``, the past the growing-cache
  wrapper hands the graph): a row's past slots ``[0, position)`` and the chunk's slots ``[live, live + time)``.
"""
from __future__ import annotations

from functools import cached_property

import numpy as np

from ..contract import ONNX_TYPE_CODES
from .graph import Surgery

#: the names our files use (the same as ``export hf:``): the tokens input and the position state
TOKENS, POSITION, POSITION_OUT = "tokens", "position", "position_out"


class PositionFeeds:
    """Tensors derived from ``tokens`` and ``position``, each added to the graph on first use."""

    def __init__(self, s: Surgery) -> None:
        self.s = s

    @cached_property
    def time(self) -> str:  # scalar int64
        shape = self.s.op("Shape", [TOKENS], "tokens_shape")
        return self.s.op("Gather", [shape, self.s.const("one", 1)], "time", axis=0)

    @cached_property
    def end(self) -> str:  # [batch]: each row's position after the chunk
        return self.s.op("Add", [POSITION, self.time], "end")

    @cached_property
    def column(self) -> str:  # [batch, 1]: each row's position, for broadcasting against a row of slots
        return self.s.op("Reshape", [POSITION, self.s.const("col", [-1, 1])], "position_col")

    def arange(self, limit: str, hint: str) -> str:
        """``[1, limit]``: 0 .. limit - 1 as a row."""
        r = self.s.op("Range", [self.s.const("zero", 0), limit, self.s.const("one", 1)], hint)
        return self.s.op("Reshape", [r, self.s.const("row", [1, -1])], f"{hint}_row")

    def position_ids(self, name: str, elem: str) -> None:
        ids = self.s.op("Add", [self.column, self.arange(self.time, "chunk")], "position_ids")
        self._emit(ids, name, elem)

    def total_mask(self, name: str, elem: str) -> None:
        """GenAI: ``[batch, max(end)]``, a row's first ``end`` slots set."""
        total = self.s.op("ReduceMax", [self.end], "total", keepdims=0)
        end_col = self.s.op("Reshape", [self.end, self.s.const("col", [-1, 1])], "end_col")
        self._emit(self.s.op("Less", [self.arange(total, "slots"), end_col], "mask"), name, elem)

    @cached_property
    def live(self) -> str:
        """Scalar: the longest past of the batch (the growing-cache wrapper hands the graph that many rows)."""
        return self.s.op("ReduceMax", [POSITION], "live", keepdims=0)

    def live_mask(self, name: str, elem: str) -> None:
        """Optimum: ``[batch, live + time]``: slots below the row's position (its past) and the chunk's own."""
        slots = self.arange(self.s.op("Add", [self.live, self.time], "live_total"), "live_slots")
        past = self.s.op("Less", [slots, self.column], "own_past")
        chunk = self.s.op("Not", [self.s.op("Less", [slots, self.live], "before_chunk")], "chunk")
        self._emit(self.s.op("Or", [past, chunk], "live_mask"), name, elem)

    def constant(self, name: str, value: bool | int, elem: str) -> None:
        """An input the convention feeds a fixed value (``use_cache_branch``: true)."""
        self.s.op("Identity", [self.s.const(name.replace("/", "_"), value, np.dtype(elem))], "const", out=name)

    def _emit(self, tensor: str, name: str, elem: str) -> None:
        """Cast to the dtype the graph declared for the input, under the input's own name."""
        self.s.op("Cast", [tensor], "cast", out=name, to=ONNX_TYPE_CODES[elem])

    def next_position(self) -> None:
        self.s.op("Identity", [self.end], "next_position", out=POSITION_OUT)
