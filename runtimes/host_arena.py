"""The host-memory state arena with ping-pong buffers, shared by the engines that bind numpy memory
zero-copy (ONNX Runtime's CPU provider through IO binding, OpenVINO through shared ``ov.Tensor``s).

Two buffers per state, ``capacity`` streams wide, and a per-slot ``parity`` saying which one holds the
live state, so a subset of slots can step without disturbing the others. A step is *planned* first:

* *view*: the slots are a contiguous ``range`` sharing one parity and their slices along the batch axis
  are C-contiguous (one stream; or a packed pool whose axes before ``batch`` are all 1, or every slot):
  the engine reads buffer ``p`` and writes buffer ``1 - p`` in place, then the parity flips. No copy.
* *gather*: otherwise the live rows are gathered into per-batch-size scratch buffers, the engine runs
  scratch-in -> scratch-out, and the result is scattered back.

A state the spec marks ``inplace`` (a KV cache the graph writes where it read it) has *one* buffer: the
engine reads and writes it in place (input and output bound to the same memory), its parity is ignored,
and gathered runs use one scratch buffer as both input and output. Rolling such a state back is not
needed: the rows a rolled-back step wrote lie beyond the stream's restored position, where they are masked.

Nothing here knows the engine: the backend wraps :meth:`views_of`/:meth:`scratch` buffers in its own
tensor type and calls :meth:`finish` after a successful run (a failed run finishes nothing, so the state
is unchanged). ``resize`` (growth and shrink of a pool) and ``checkpoint``/``rollback``/``commit`` (undo
of a multi-call pool step) follow :mod:`.base`; undo is free here, the old state is in the other buffer.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from wmdeploy.contract import StreamingSpec
from wmdeploy.errors import BackendError

from .base import Slots, StateArena

_MAX_SCRATCH = 16  # batch sizes whose scratch buffers are kept; a pool with more re-allocates the rest


def batch_index(ndim: int, axis: int, index: Any) -> tuple[Any, ...]:
    return (slice(None),) * axis + (index,) + (slice(None),) * (ndim - axis - 1)


@dataclass
class Plan:
    """How one step binds the state: ``view`` = (parity, lo, hi), or a gather of ``idx`` through scratch."""

    view: tuple[int, int, int] | None
    idx: np.ndarray | None = None
    scratch: tuple[list[np.ndarray], list[np.ndarray]] | None = None
    # a contiguous range whose ping-pong states have mixed parities: in-place states bound as views, only the
    # ping-pong ones gathered (``scratch`` holds the arena views at the in-place states' places)
    mixed: tuple[int, int] | None = None


class HostArena(StateArena):
    """Two host buffers per state, ``capacity`` streams wide, plus a per-slot parity (which one is live)."""

    def __init__(self, spec: StreamingSpec, capacity: int) -> None:
        self.spec, self.states = spec, spec.states
        self.capacity = 0
        self.both: list[np.ndarray] = []
        self.parity = np.zeros(0, dtype=np.intp)
        self.preserving = False  # a checkpoint is open: gathered runs write the other buffer (see finish)
        self._scratch: OrderedDict[int, tuple[list[np.ndarray], list[np.ndarray]]] = OrderedDict()
        self.generation = 0  # bumped whenever buffers are re-allocated: engines drop their cached wrappers
        self._contiguous: dict[tuple[int, int], bool] = {}  # (lo, hi) -> whether its views are C-contiguous
        self.resize(capacity, 0)

    def resize(self, capacity: int, keep: int) -> None:
        """Reallocate for ``capacity`` slots; slots ``0..keep-1`` keep their states bit for bit (base.py)."""
        if capacity < 1 or not 0 <= keep <= min(capacity, self.capacity or capacity):
            raise BackendError(f"arena resize to {capacity} slots keeping {keep}: out of range (capacity {self.capacity})")
        # Every buffer is allocated before anything changes: running out of memory leaves the arena as it was.
        both = [np.empty((1 if s.inplace else 2, *s.shape_for(capacity)), dtype=s.np_dtype) for s in self.states]
        for i, (s, arr) in enumerate(zip(self.states, both)):
            if keep:  # the live rows (whichever buffer holds them), compacted into buffer 0
                self.gather(i, np.arange(keep, dtype=np.intp), out=arr[0][batch_index(arr.ndim - 1, s.batch_axis, slice(0, keep))])
            arr[0][batch_index(arr.ndim - 1, s.batch_axis, slice(keep, capacity))] = s.init
            # Buffer 1 stays unwritten: a slot's other buffer is read only after a run wrote it.
        self.both, self.capacity = both, capacity
        self.parity = np.zeros(capacity, dtype=np.intp)
        self.nbytes = sum(arr.nbytes for arr in both)
        self.generation += 1
        self._contiguous.clear()

    # ---- host access ----------------------------------------------------------------------------------
    @staticmethod
    def slots_array(slots: Slots) -> np.ndarray:
        if isinstance(slots, range):
            return np.arange(slots.start, slots.stop, dtype=np.intp)
        return np.asarray(slots, dtype=np.intp)

    def _parity(self, i: int, idx: np.ndarray) -> np.ndarray:
        """Which buffer holds each slot's live state (always buffer 0 for an in-place state)."""
        return np.zeros(len(idx), np.intp) if self.states[i].inplace else self.parity[idx]

    def gather(self, i: int, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        s, both = self.states[i], self.both[i]
        ax = s.batch_axis
        par = self._parity(i, idx)
        if out is None:
            out = np.empty(s.shape_for(len(idx)), dtype=s.np_dtype)
        if len(idx) and (par == par[0]).all():
            np.take(both[par[0]], idx, axis=ax, out=out)  # the common case: one copy, no temporaries
        else:
            np.moveaxis(out, ax, 0)[...] = np.moveaxis(both, ax + 1, 1)[par, idx]
        return out

    def scatter(self, i: int, idx: np.ndarray, values: np.ndarray) -> None:
        ax = self.states[i].batch_axis
        np.moveaxis(self.both[i], ax + 1, 1)[self._parity(i, idx), idx] = np.moveaxis(values, ax, 0)

    def read(self, slots: Slots) -> dict[str, np.ndarray]:
        idx = self.slots_array(slots)
        return {s.name: self.gather(i, idx) for i, s in enumerate(self.states)}

    def write(self, slots: Slots, states: Mapping[str, np.ndarray]) -> None:
        idx = self.slots_array(slots)
        # A full overwrite may pick either buffer: align with slot 0 so packed pools stay on the view path.
        self.parity[idx] = self.parity[0]
        for i, s in enumerate(self.states):
            self.scatter(i, idx, self._fit(s, np.asarray(states[s.name], dtype=s.np_dtype)))

    def _fit(self, s: Any, values: np.ndarray) -> np.ndarray:
        """A state of another capacity (the file's full one, into a capacity tier's arena, or the reverse): the
        rows past the shorter context axis lie beyond every stream's position (masked), so they are cut or zeros."""
        axis = (self.spec.meta.get("context_axes") or {}).get(s.name)
        want = s.shape_for(values.shape[s.batch_axis]) if values.ndim == len(s.shape) else values.shape
        if axis is None or values.shape == want or values.shape[:axis] + values.shape[axis + 1:] != want[:axis] + want[axis + 1:]:
            return values  # the same shape, or a wrong one that scatter refuses
        out = np.zeros(want, values.dtype)
        rows = (slice(None),) * axis + (slice(0, min(values.shape[axis], want[axis])),)
        out[rows] = values[rows]
        return out

    def reset(self, slots: Slots) -> None:
        idx = self.slots_array(slots)
        self.parity[idx] = self.parity[0]
        for i, s in enumerate(self.states):
            np.moveaxis(self.both[i], s.batch_axis + 1, 1)[self._parity(i, idx), idx] = s.init

    def move(self, src: int, dst: int) -> None:
        if src != dst:
            self.write([dst], self.read([src]))

    # ---- stepping -------------------------------------------------------------------------------------
    #: engines whose binding takes a :attr:`Plan.mixed` plan (ONNX Runtime's CPU arena) set this
    supports_mixed = False

    def plan(self, slots: Slots) -> Plan:
        if isinstance(slots, range) and len(slots) and slots.step == 1:
            lo, hi = slots.start, slots.stop
            p = int(self.parity[lo])
            ok = self._contiguous.get((lo, hi))
            if ok is None:  # the same for both buffers and every parity: worked out once per slot range
                ok = self._contiguous[(lo, hi)] = all(v.flags.c_contiguous for v in self.views_of(p, lo, hi))
                if len(self._contiguous) > 4 * _MAX_SCRATCH:
                    self._contiguous.pop(next(iter(self._contiguous)))
            if ok and (hi - lo == 1 or (self.parity[lo:hi] == p).all()):
                return Plan((p, lo, hi))
            if ok and self.supports_mixed and any(s.inplace for s in self.states):
                # streams that stepped different numbers of times: gathering their KV caches would copy every
                # row's whole capacity per step; only the small ping-pong states (the position) are gathered
                idx = self.slots_array(slots)
                ins, outs = self.scratch(len(idx))
                views = self.views_of(0, lo, hi)
                both = ([v if s.inplace else b for s, v, b in zip(self.states, views, ins)],
                        [v if s.inplace else b for s, v, b in zip(self.states, views, outs)])
                return Plan(None, idx, both, mixed=(lo, hi))
        idx = self.slots_array(slots)
        return Plan(None, idx, self.scratch(len(idx)))

    def views_of(self, parity: int, lo: int, hi: int) -> list[np.ndarray]:
        """Buffer ``parity``'s slices of slots ``lo:hi`` (views into the arena, one per state)."""
        return [both[0 if s.inplace else parity][batch_index(both.ndim - 1, s.batch_axis, slice(lo, hi))]
                for s, both in zip(self.states, self.both)]

    def scratch(self, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        hit = self._scratch.get(n)
        if hit is None:
            bufs_in = [np.empty(s.shape_for(n), s.np_dtype) for s in self.states]
            # an in-place state is read and written in one buffer: the engine binds it as input and output
            bufs_out = [b if s.inplace else np.empty_like(b) for s, b in zip(self.states, bufs_in)]
            hit = self._scratch[n] = (bufs_in, bufs_out)
            if len(self._scratch) > _MAX_SCRATCH:
                self._scratch.popitem(last=False)
        else:
            self._scratch.move_to_end(n)
        return hit

    def gather_into(self, plan: Plan) -> None:
        assert plan.idx is not None and plan.scratch is not None
        for i, s in enumerate(self.states):
            if not (plan.mixed and s.inplace):  # a mixed plan's in-place states are the arena's own views
                self.gather(i, plan.idx, out=plan.scratch[0][i])

    def finish(self, plan: Plan) -> None:
        """After a successful run: the written buffer becomes live (view) or is scattered back (gather)."""
        if plan.view is not None:
            _, lo, hi = plan.view
            self.parity[lo:hi] ^= 1
        else:
            assert plan.idx is not None and plan.scratch is not None
            if self.preserving:  # keep the old state in the live buffer: a rollback flips back to it
                self.parity[plan.idx] ^= 1
            else:  # either buffer may take it: slot 0's, so that mixed parities heal and views come back
                self.parity[plan.idx] = self.parity[0]
            for i, s in enumerate(self.states):
                if not (plan.mixed and s.inplace):  # written where it lives
                    self.scatter(i, plan.idx, plan.scratch[1][i])

    # ---- undo (base.StateArena.checkpoint): the old state stays in the other buffer ---------------------
    def checkpoint(self, slots: Slots) -> Any:
        self.preserving = True
        idx = self.slots_array(slots)
        return idx, self.parity[idx].copy()

    def rollback(self, token: Any) -> None:
        idx, parity = token
        self.parity[idx] = parity
        self.preserving = False

    def commit(self, token: Any) -> None:
        self.preserving = False
