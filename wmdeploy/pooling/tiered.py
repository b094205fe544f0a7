"""A pool whose KV memory follows each stream's context, not the file's capacity, under a byte budget.

A file written by ``export hf:`` leaves the context axis of its KV states dynamic in the graph
(``spec.context_dim``; the spec keeps the bound, ``meta.max_context``, so snapshots' layout hash is the same at
every capacity). :class:`TieredPool` keeps one one-tier pool (a ``StreamPool`` over arenas of that capacity)
per *tier* — 256, 1024, 4096, ... by default (x4 from 256; the last is the file's bound) — and each stream in the
smallest tier that holds it. Before a step that would take a stream past its tier, the stream *moves*: its
snapshot (the KV cache up to its position only: the live prefix) joins the next tier's pool under the same id,
exact bit for bit, and it leaves the old one; a tier whose last stream left gives its memory back at once.
Streams of one tier batch together; a step across tiers makes one engine call per tier (and chunk shape)
through :func:`.calls.run_calls`, all-or-nothing across the tiers as within one.

``max_bytes`` caps the bytes the arenas hold: a join, or a move into a tier whose arena must grow, that would
pass it raises ``CapacityError`` naming the budget before anything changes (a server answers 429 and first
evicts idle sessions to its store), and an arena that would double past it grows only as far as it fits.
Gather scratch buffers and a move's passing snapshot are not counted. A file without a dynamic context (older
exports, adopted files, non-LM models) or a backend without tiers gets one tier: the budget still holds.
"""
from __future__ import annotations

import itertools
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .. import snapshot as _snap
from .._inputs import ContextBound
from ..errors import CapacityError, InputError
from .calls import run_calls
from .limits import pool_args

SMALLEST = 256  # the first default tier (tokens): a chat turn; x GROWTH up to the file's bound
GROWTH = 4  # few tiers (one engine call each per step) for at most 4x the bytes a stream's context needs


def tier_sizes(model: Any, tiers: Sequence[int] | None = None) -> list[int | None]:
    """The capacity of each tier, smallest first; ``None`` is the file's own (its bound, or no context at all)."""
    spec = model.spec
    bound = spec.meta.get("max_context")
    if spec.context_dim is None or bound is None or not getattr(model.backend, "context_tiers", False):
        if tiers:
            raise InputError(f"pool tiers {list(tiers)}: this file's KV capacity is fixed in its graph (no "
                             f"meta.context_dim; re-export it) or backend '{model.backend.name}' has no tiers")
        return [None]
    if tiers is None:
        sizes = [SMALLEST * GROWTH ** i for i in range(16) if SMALLEST * GROWTH ** i < int(bound)]
    else:
        sizes = [int(t) for t in tiers]
        if any(isinstance(t, bool) or not 1 <= t <= int(bound) for t in tiers):
            raise InputError(f"pool tiers {list(tiers)}: expected token counts in 1..{bound} (meta.max_context)")
    return [*sorted({t for t in sizes if t < int(bound)}), None]


class _TierBackend:
    """The model's backend, allocating arenas of one tier's capacity (all else is the backend's own)."""

    def __init__(self, backend: Any, context: int) -> None:
        self._backend, self._context = backend, context

    def arena(self, capacity: int) -> Any:
        return self._backend.arena(capacity, context=self._context)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


class _TierModel:
    """What a one-tier pool reads of its model: the file's spec (snapshots, checks) and the tier's backend."""

    def __init__(self, model: Any, context: int | None) -> None:
        self.spec = model.spec
        self.backend = model.backend if context is None else _TierBackend(model.backend, context)


class TieredPool:
    """``StreamPool``'s interface over capacity tiers and a byte budget (see the module doc)."""

    def __init__(self, model: Any, make_pool: Callable[..., Any], capacity: int | None = None, *, reserve: int = 0,
                 shrink_after_s: float = 30.0, max_bytes: int | None = None,
                 tiers: Sequence[int] | None = None) -> None:
        self.capacity, self.reserve = pool_args(capacity, reserve, shrink_after_s)
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer))
                                      or max_bytes < 1):
            raise InputError(f"pool max_bytes {max_bytes!r}: expected a byte count of at least 1, or None")
        self.model, self.spec, self.shrink_after_s = model, model.spec, float(shrink_after_s)
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self.tiers = tier_sizes(model, tiers)
        self._bound = ContextBound.of(self.spec)
        bound = self._bound.capacity if self._bound is not None else None
        self.capacities = [t if t is not None else bound for t in self.tiers]  # tokens each tier holds (None: any)
        self._slot_bytes = [sum(s.bytes_per_stream * (1 if s.inplace else 2) for s in
                                (self.spec if t is None else self.spec.at_context(t)).states) for t in self.tiers]
        self._make = make_pool
        self._pools: dict[int, Any] = {}  # tier index -> its pool (only while it holds streams, or reserves)
        self._tier: dict[int, int] = {}  # sid -> tier index
        self._ids = itertools.count()  # ids are the pool's, kept across moves (a tier's pool joins with sid=)
        self.moves = 0
        self._gone = {"grow": 0, "shrink": 0}  # resizes of tier pools since dropped
        if self.reserve:
            self._open(0)

    # ---- what it holds ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._tier)

    def __contains__(self, sid: object) -> bool:
        return isinstance(sid, (int, np.integer)) and not isinstance(sid, (bool, np.bool_)) and sid in self._tier

    @property
    def sids(self) -> list[int]:
        return list(self._tier)

    # read by a server's /metrics from another thread: copies of the dict (one C call) are iterated, never the dict

    @property
    def allocated(self) -> int:
        return sum(p.allocated for p in list(self._pools.values()))

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in list(self._pools.values()))

    def bytes_by_tier(self) -> dict[int, int]:
        """Bytes held per tier, keyed by the tokens it holds (0: a model without a context bound)."""
        pools = dict(self._pools)
        return {self.capacities[k] or 0: pools[k].nbytes if k in pools else 0 for k in range(len(self.tiers))}

    @property
    def resizes(self) -> dict[str, int]:
        return {k: n + sum(p.resizes[k] for p in self._pools.values()) for k, n in self._gone.items()}

    def _pool_of(self, sid: int) -> Any:
        if sid not in self:
            raise InputError(f"stream {sid!r}: not in this pool (it left, or was never joined)")
        return self._pools[self._tier[sid]]

    # ---- memory -------------------------------------------------------------------------------------
    def _room(self, k: int, reclaim: bool = True) -> int | None:
        """Before a stream joins tier ``k``: the slots its pool may grow to (None: as it likes), or
        ``CapacityError`` naming the budget when not even one more slot fits, even after every tier's pool gave
        back its empty slots (at the budget the shrink delay does not apply: the memory is needed now)."""
        pool, per = self._pools.get(k), self._slot_bytes[k]
        if self.max_bytes is None or (pool is not None and len(pool) < pool.allocated):
            return None  # no budget, or a free slot: nothing to allocate
        free = self.max_bytes - self.nbytes
        slots = max(1, self.reserve if k == 0 else 1) if pool is None else min(pool.allocated, free // per)
        if (slots < 1 or slots * per > free) and reclaim and any([p.trim(force=True) for p in self._pools.values()]):
            return self._room(k, reclaim=False)
        if slots < 1 or slots * per > free:
            tier = f"{self.capacities[k]}-token tier" if self.capacities[k] else "pool"
            raise CapacityError(f"pool: memory budget of {self.max_bytes} bytes (max_bytes, serve --max-memory) "
                                f"reached: {self.nbytes} held, a stream in the {tier} needs {per} more; "
                                "end or evict a stream, or raise the budget")
        return None if pool is None else pool.allocated + slots

    def _open(self, k: int) -> Any:
        pool = self._pools.get(k)
        if pool is None:
            self._room(k)
            pool = self._make(_TierModel(self.model, self.tiers[k]), None, reserve=self.reserve if k == 0 else 0,
                              shrink_after_s=self.shrink_after_s)
            self._pools[k] = pool
        return pool

    def _close_if_empty(self, k: int) -> None:
        pool = self._pools.get(k)
        if pool is not None and not len(pool) and not (k == 0 and self.reserve):
            for key in self._gone:
                self._gone[key] += pool.resizes[key]
            del self._pools[k]  # its arena goes with it: an empty tier holds nothing

    def _join_tier(self, k: int, snapshot: bytes | None, sid: int | None) -> int:
        limit = self._room(k) if k in self._pools else None
        pool = self._open(k)
        pool.capacity = limit  # the budget caps the arena's growth (x2 beyond it would pass the budget)
        try:
            return pool.join(snapshot, sid=sid)
        finally:
            pool.capacity = None
            self._close_if_empty(k)

    def trim(self) -> bool:
        """Give back memory most slots of a tier have left unused for ``shrink_after_s`` (see ``StreamPool``)."""
        shrank = [p.trim() for p in self._pools.values()]
        return any(shrank)

    # ---- membership ---------------------------------------------------------------------------------
    def _tier_for(self, tokens: int) -> int | None:
        return next((k for k, cap in enumerate(self.capacities) if cap is None or tokens <= cap), None)

    def join(self, snapshot: bytes | None = None) -> int:
        """Add a stream (fresh: the smallest tier; a snapshot: the smallest that holds its position); its id."""
        if self.capacity is not None and len(self) >= self.capacity:
            raise CapacityError(f"pool: all {self.capacity} slots are taken; leave a stream or make a bigger pool")
        k = 0 if snapshot is None else self._tier_for(self._position_in(snapshot))
        k = len(self.tiers) - 1 if k is None else k  # past the bound: the last tier's pool refuses it, saying why
        sid = self._join_tier(k, snapshot, next(self._ids))
        self._tier[sid] = k
        return sid

    open = join

    def _position_in(self, blob: bytes) -> int:
        """The position a snapshot holds, read without loading its states (the tier's pool checks it all)."""
        if self._bound is None:
            return 0
        try:
            header, block = _snap.read_header(blob)
            e = next(e for e in header["states"] if isinstance(e, dict) and e.get("name") == self._bound.state)
            held = np.frombuffer(block, np.dtype(e["dtype"]), int(np.prod(e["shape"])), int(e["offset"]))
            return int(held.max()) if held.size else 0
        except Exception:  # noqa: BLE001  (a malformed snapshot: the pool's own checks refuse it, saying why)
            return 0

    def leave(self, sid: int) -> None:
        self._pool_of(sid).leave(sid)
        self._close_if_empty(self._tier.pop(sid))

    def reset(self, sid: int) -> None:
        self._pool_of(sid).reset(sid)  # it keeps its tier's slot: the next steps need no allocation

    def check_context(self, sid: int, inputs: Mapping[str, np.ndarray], where: str = "") -> None:
        self._pool_of(sid).check_context(sid, inputs, where)

    def position(self, sid: int) -> int:
        return self._pool_of(sid).position(sid)

    def snapshot(self, sid: int) -> bytes:
        return self._pool_of(sid).snapshot(sid)  # the file's layout, KV up to the position: the same at every tier

    def state(self, sid: int) -> Mapping[str, np.ndarray]:
        """The stream's states at the file's full shapes (a tier's shorter KV buffers zero-padded: masked rows)."""
        held = self._pool_of(sid).state(sid)
        axes = _snap.context_axes(self.spec)
        out = {}
        for s in self.spec.states:
            arr, full = held[s.name], s.shape_for(1)
            if arr.shape != full and s.name in axes:
                padded = np.zeros(full, arr.dtype)
                padded[(slice(None),) * axes[s.name] + (slice(0, arr.shape[axes[s.name]]),)] = arr
                arr = padded
            arr.flags.writeable = False
            out[s.name] = arr
        return MappingProxyType(out)

    # ---- tiers --------------------------------------------------------------------------------------
    def fit(self, sid: int, inputs: Mapping[str, Any]) -> bool:
        """Move stream ``sid`` up to the tier that holds ``inputs`` after what it holds, if its own does not (a
        server calls this per session before batching, so that a budget refusal is that session's alone).
        True if it moved; ``CapacityError`` at the budget (the stream stays where it was, unchanged)."""
        self._pool_of(sid)
        k = self._tier[sid]
        if self._bound is None or self.capacities[k] is None:
            return False
        tokens = np.shape(inputs.get(self._bound.tokens.name, ()))
        axis = self._bound.time_axis
        need = self._pools[k].position(sid) + (int(tokens[axis]) if axis is not None and len(tokens) > axis else 1)
        up = self._tier_for(need)
        if up is None or up <= k:
            return False  # it fits, or nothing holds it: the step is refused with ContextLengthError
        blob = self._pools[k].snapshot(sid)  # its live prefix: exact, and what the tier's pool reads back
        self._join_tier(up, blob, sid)
        self._pools[k].leave(sid)
        self._close_if_empty(k)
        self._tier[sid] = up
        self.moves += 1
        return True

    def step(self, requests: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, np.ndarray]]:
        """Step the streams in ``requests`` (sid -> inputs, batch 1): moves first, then one engine call per tier
        and chunk shape, all-or-nothing (a refused move or input runs nothing; a failed call rolls back all)."""
        for sid, inputs in requests.items():
            self.fit(sid, inputs)
        by_tier: dict[int, dict[int, Mapping[str, Any]]] = {}
        for sid, inputs in requests.items():
            by_tier.setdefault(self._tier[sid], {})[sid] = inputs
        plans = [(self._pools[k], *self._pools[k].plan(reqs)) for k, reqs in by_tier.items()]
        outs = run_calls([c for _, calls, _ in plans for c in calls])
        results: dict[int, dict[str, np.ndarray]] = {}
        for pool, calls, advance in plans:
            results.update(pool.settle(calls, outs[:len(calls)], advance))
            outs = outs[len(calls):]
        return results

    def __repr__(self) -> str:
        limit = "no limit" if self.capacity is None else f"limit {self.capacity}"
        budget = "" if self.max_bytes is None else f", {self.nbytes}/{self.max_bytes} bytes"
        return f"TieredPool({len(self)} streams in tiers {self.capacities}{budget}, {limit})"
