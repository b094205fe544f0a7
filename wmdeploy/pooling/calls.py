"""The engine calls of one pool step, run all-or-nothing, across one arena or several (capacity tiers).

A pool step groups its streams into engine calls (one per chunk shape, per capacity tier, per fixed-batch
slice); :func:`run_calls` runs them in order and, if a later call fails, rolls the streams of the earlier
calls back (each arena's ``checkpoint``: free for the ping-pong host arena, whose old state is still in the
other buffer), so a failed step leaves every stream as it was, whichever arenas they live in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..runtimes.base import Backend, Slots, StateArena


@dataclass
class Call:
    """One engine call: the streams ``members`` ((slot, sid, feeds) in slot order) at ``slots`` of ``arena``,
    stepped by ``backend`` with their feeds concatenated along the batch axis (``feeds``)."""

    backend: Backend
    arena: StateArena
    members: list[tuple[int, int, dict[str, np.ndarray]]]
    slots: Slots
    feeds: dict[str, np.ndarray]


def run_calls(calls: list[Call]) -> list[dict[str, np.ndarray]]:
    """Each call's data outputs, in order; if one raises, the earlier calls' streams are rolled back first."""
    tokens: list[tuple[StateArena, Any]] = []
    if len(calls) > 1:  # the earlier calls' streams must be restorable if a later call fails
        held: dict[int, tuple[StateArena, list[int]]] = {}
        for call in calls[:-1]:
            held.setdefault(id(call.arena), (call.arena, []))[1].extend(m[0] for m in call.members)
        tokens = [(arena, arena.checkpoint(np.asarray(slots, np.intp))) for arena, slots in held.values()]
    outs = []
    try:
        for call in calls:
            outs.append(call.backend.run(call.arena, call.slots, call.feeds))
    except BaseException:
        for arena, token in tokens:
            arena.rollback(token)
        raise
    for arena, token in tokens:
        arena.commit(token)
    return outs
