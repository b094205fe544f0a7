"""The streaming runtime: ``load`` a model, step ``Stream`` s, or step many streams at once in a ``StreamPool``.

Torch-free: numpy + a backend from :mod:`wmdeploy.runtimes` (ONNX Runtime on CPU so far). ``Stream`` and
``StreamPool`` own the state's *lifecycle* (fresh, reset, snapshot, restore, join, leave); the backend
owns the state's *memory* (a :class:`~wmdeploy.runtimes.base.StateArena`) and advances it in place, so
neither class ever looks inside a backend, and state reaches Python only for ``state`` and snapshots.
Pool inputs carry a batch axis of size 1, as ``Stream.step`` takes them for a one-stream ``Stream``.

Chunks of different lengths in one pool step: the pool groups the stepping streams by the shapes of
their inputs and makes one engine call per distinct shape, never padding (a generic graph has no mask
input, so padded steps would run through the recurrence and change the state). The cost is one extra
engine call per extra distinct length (``bench/bench_runtime.py``). Within one call streams never mix.

Language models with a context bound (``meta.max_context``, ``export hf:``) carry each stream's position: a step
past it is refused before any engine call (``ContextLengthError``); snapshots: KV to there; capacity tiers and a
byte budget: :mod:`wmdeploy.pooling`.

Memory follows the live streams: a pool's ``capacity`` is a limit (``None``: none), not an allocation.
Its arena grows geometrically (x2) when a stream joins a full arena, and shrinks (to twice the live
streams, rounded up to a power of two) once at most a quarter of its slots have been in use for
``shrink_after_s`` seconds: the factor-4 gap between the two thresholds is the hysteresis that keeps a
join/leave at a boundary from reallocating, and the delay keeps a burst of leaves from giving back
memory that the next burst of joins would take again. Growth copies the live states bit for bit; ids never
change; ``reserve`` slots are allocated up front and never given back (``reserve=capacity``: pre-sized).

A pool step is all-or-nothing: inputs are checked before any engine call, and when a step makes several
engine calls (several chunk lengths) and a later one fails, the earlier groups' states are rolled back
(the arena's ``checkpoint``; with ping-pong buffers the old state is still there, so it costs nothing).
Not thread-safe: use one ``Stream``/``StreamPool`` per thread (the backend's session itself is shared).
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import numpy as np

from . import snapshot as _snap
from ._inputs import ContextBound, check_inputs, rows_of
from .contract import StreamingSpec
from .errors import BackendError, CapacityError, InputError, SnapshotError
from .pooling.calls import Call, run_calls
from .pooling.limits import pool_args
from .pooling.tiered import TieredPool, tier_sizes
from .runtimes import create
from .runtimes.base import Backend, StateArena


def load(path: str | Path, backend: str = "auto", device: str = "cpu", *, spec: StreamingSpec | None = None,
         threads: int | None = None, inter_op_threads: int | None = None, graph_optimization_level: str = "all",
         providers: list[Any] | None = None, session_options: Any = None, **backend_options: Any) -> "Model":
    """Load an ONNX model carrying a wmdeploy spec (``backend``: ``"auto"`` or a name in the registry).

    ``spec`` overrides the one in the file's metadata. Engine options (threads, graph optimisation level
    ``disable|basic|extended|all``, providers, a ready ``onnxruntime.SessionOptions``) go to the backend,
    and so do ``backend_options`` (e.g. ``cuda_graph=True`` for ``onnxruntime-cuda``; ``fp16``,
    ``cache_dir``, ``batch``/``axes`` profile ranges for ``onnxruntime-tensorrt``).
    ``Model.selection`` says which backend was picked and why.
    """
    options = {"threads": threads, "inter_op_threads": inter_op_threads,
               "graph_optimization_level": graph_optimization_level, "providers": providers,
               "session_options": session_options, **backend_options}
    engine, why = create(Path(path), spec, backend, device, **options)
    return Model(engine, why)


def _is_sid(sid: object) -> bool:
    return isinstance(sid, (int, np.integer)) and not isinstance(sid, (bool, np.bool_))


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _freeze(states: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    for arr in states.values():
        arr.flags.writeable = False
    return MappingProxyType(states)


class Model:
    """A loaded streaming model: a spec plus a backend. Cheap to hold; streams and pools share it."""

    def __init__(self, backend: Backend, selection: str = "") -> None:
        self.backend = backend
        self.spec: StreamingSpec = backend.spec
        self.selection = selection  # which backend and why, in words
        if self.spec.max_batch is not None:  # a fixed-batch graph: say why pools do not batch
            self.selection += (f"; batch fixed at {self.spec.max_batch} by the graph (meta.max_batch): "
                               f"a pool steps at most {self.spec.max_batch} stream(s) per engine call")

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def device(self) -> str:
        return self.backend.device

    @property
    def path(self) -> Path:
        return self.backend.path

    def stream(self, snapshot: bytes | None = None, *, batch: int = 1) -> "Stream":
        """A fresh working memory (the spec's initial values), or one resumed from ``snapshot``."""
        return Stream(self, batch=batch, snapshot=snapshot)

    def pool(self, capacity: int | None = None, *, reserve: int = 0, shrink_after_s: float = 30.0,
             max_bytes: int | None = None, tiers: Sequence[int] | None = None) -> "StreamPool | TieredPool":
        """Streams stepped together, one engine call per distinct chunk shape; at most ``capacity`` of them
        (``None``: no limit). Memory grows with the streams that join; ``reserve`` slots are allocated now. A file
        with a dynamic KV capacity keeps each stream in the smallest of ``tiers`` that holds it; ``max_bytes`` caps
        what the arenas hold (``CapacityError`` beyond): then it is a ``pooling.TieredPool``."""
        opts: dict[str, Any] = {"reserve": reserve, "shrink_after_s": shrink_after_s}
        if max_bytes is not None or len(tier_sizes(self, tiers)) > 1:  # StreamPool: the pool of each tier
            return TieredPool(self, StreamPool, capacity, max_bytes=max_bytes, tiers=tiers, **opts)
        return StreamPool(self, capacity, **opts)

    def describe(self) -> dict[str, Any]:
        return {**self.backend.describe(), "selection": self.selection, "path": str(self.path)}

    def close(self) -> None:
        self.backend.close()

    def __repr__(self) -> str:
        return f"Model({str(self.path)!r}, backend={self.backend_name!r}, device={self.device!r})"


class Stream:
    """One working memory moving forward step by step (``batch`` independent sequences in lock step)."""

    def __init__(self, model: Model, batch: int = 1, snapshot: bytes | None = None) -> None:
        self.model, self.spec = model, model.spec
        restored, steps = None, 0
        if snapshot is not None:
            restored = _snap.loads(self.spec, snapshot)  # every check before any allocation
            steps = _snap.steps_of(snapshot)
            if self.spec.states:
                first = self.spec.states[0]
                batch = restored[first.name].shape[first.batch_axis]
        if batch < 1:
            raise InputError(f"stream batch {batch}: expected at least 1")
        self.batch = batch
        self._slots = range(0, batch)
        self._bound = ContextBound.of(self.spec)  # a language model's context capacity, if it has one
        self._pos = np.zeros(batch, np.int64)
        if restored is not None and self._bound is not None:
            self._pos = self._bound.positions(restored)
        self._arena: StateArena = model.backend.arena(batch)
        self.steps = 0
        if restored is not None:
            self._arena.write(self._slots, restored)
            self.steps = steps

    def step(self, /, **inputs: Any) -> dict[str, np.ndarray]:  # /: an input may be called "self"
        """Feed one chunk; return the data outputs. The state advances only if the step succeeds."""
        feeds, _ = check_inputs(self.spec, inputs, self.batch)
        t = self._bound.check(self._pos, feeds) if self._bound is not None else 0
        if t > 1 and self.batch > 1 and self._bound.one_row_per_chunk(self._pos):  # type: ignore[union-attr]
            out = self._bound.run_rows(self.model.backend, self._arena, feeds)  # type: ignore[union-attr]
        else:
            out = self.model.backend.run(self._arena, self._slots, feeds)
        self.steps += 1
        self._pos += t
        return out

    @property
    def position(self) -> int:
        """Tokens this stream holds (a language model with a context bound; 0 otherwise)."""
        return int(self._pos.max())

    def reset(self) -> None:
        """Back to the initial state (a new conversation)."""
        self._arena.reset(self._slots)
        self.steps = 0
        self._pos[:] = 0

    @property
    def state(self) -> Mapping[str, np.ndarray]:
        """A read-only copy of the working memory (state name -> array); reads it back from the backend."""
        return _freeze(self._arena.read(self._slots))

    def snapshot(self) -> bytes:
        """The working memory as self-checking bytes; resume with ``model.stream(snapshot=...)``."""
        return _snap.dumps(self.spec, self._arena.read(self._slots), {"steps": self.steps},
                           int(self._pos.max()) if self._bound is not None else None)

    def __repr__(self) -> str:
        return f"Stream(batch={self.batch}, steps={self.steps})"


class StreamPool:
    """Streams (at most ``capacity``; ``None``: no limit), each with its own working memory, stepped in
    batched engine calls; the state arena grows and shrinks with the live streams (see the module doc).

    Stream ids (``sid``) are ints handed out by :meth:`join` and never reused. Live streams are kept in
    the arena's first ``len(pool)`` slots (a leaving stream's slot takes the last one), so that when every
    stream steps, the backend binds the arena directly with no gather or scatter where the state layout
    allows it, and so that a resize keeps one contiguous prefix. Streams absent from a step keep their
    state untouched.
    """

    def __init__(self, model: Model, capacity: int | None = None, *, reserve: int = 0,
                 shrink_after_s: float = 30.0) -> None:
        capacity, reserve = pool_args(capacity, reserve, shrink_after_s)
        self.model, self.spec, self.capacity = model, model.spec, capacity
        self.reserve, self.shrink_after_s = reserve, float(shrink_after_s)
        self._floor = max(1, reserve)  # never shrink below this many slots
        self._arena: StateArena = model.backend.arena(self._floor)
        self._slot: dict[int, int] = {}  # sid -> slot
        self._sid_at: list[int] = []  # slot -> sid, packed
        self._steps: dict[int, int] = {}
        self._bound = ContextBound.of(self.spec)
        self._pos: dict[int, int] = {}  # sid -> tokens held (a language model with a context bound)
        self._ids = itertools.count()
        self._low_since: float | None = None  # when occupancy last fell to a quarter or less
        self.resizes = {"grow": 0, "shrink": 0}

    def __len__(self) -> int:
        return len(self._sid_at)

    def __contains__(self, sid: object) -> bool:
        return _is_sid(sid) and sid in self._slot

    @property
    def sids(self) -> list[int]:
        return list(self._sid_at)

    @property
    def allocated(self) -> int:
        """Slots the arena holds memory for now (>= ``len(pool)``)."""
        return self._arena.capacity

    @property
    def nbytes(self) -> int:
        """Bytes of state memory the arena holds now (0 where its backend does not say)."""
        return self._arena.nbytes

    def _slot_of(self, sid: int) -> int:
        try:
            if not _is_sid(sid):  # True and 1.0 equal 1 as dict keys: they would name stream 1
                raise KeyError(sid)
            return self._slot[sid]
        except (KeyError, TypeError):
            raise InputError(f"stream {sid!r}: not in this pool (it left, or was never joined)") from None

    # ---- memory ---------------------------------------------------------------------------------------
    def _resize(self, slots: int) -> None:
        """Reallocate the arena for ``slots``, keeping the live prefix; the arena is unchanged on failure."""
        keep = len(self._sid_at)
        try:
            self._arena.resize(slots, keep)
        except NotImplementedError:  # an arena without resize: a new one, live states through the host
            arena = self.model.backend.arena(slots)
            if keep:
                arena.write(range(keep), self._arena.read(range(keep)))
            self._arena = arena
        self._low_since = None

    def trim(self, force: bool = False) -> bool:
        """Give memory back if at most a quarter of the slots have been in use for ``shrink_after_s`` (also checked
        on every leave and step; a server calls it from its periodic sweep). True if it shrank. ``force``: now,
        down to the live streams (a tiered pool at its memory budget)."""
        n, allocated = len(self._sid_at), self._arena.capacity
        if allocated <= max(self._floor, n) or (n > allocated // 4 and not force):
            self._low_since = None
            return False
        now = time.monotonic()
        if self._low_since is None:
            self._low_since = now
        if now - self._low_since < self.shrink_after_s and not force:
            return False
        try:
            self._resize(max(self._floor, n if force else _pow2_at_least(2 * n)))
        except (MemoryError, BackendError):  # shrinking is an optimisation: keep the memory, retry later
            self._low_since = now
            return False
        self.resizes["shrink"] += 1
        return True

    # ---- membership -----------------------------------------------------------------------------------
    def join(self, snapshot: bytes | None = None, *, sid: int | None = None) -> int:
        """Add a stream (fresh, or resumed from a one-stream snapshot); return its id (``sid``: this one, which
        a tiered pool gives a stream it moves between its tiers' pools, so that its id never changes).

        All-or-nothing: the snapshot is checked in full before the pool changes, so a refused one takes
        no slot. ``CapacityError`` at the pool's limit, or if its arena cannot grow (out of memory).
        """
        if self.capacity is not None and len(self._sid_at) >= self.capacity:
            raise CapacityError(f"pool: all {self.capacity} slots are taken; leave a stream or make a bigger pool")
        restored, steps = None, 0
        if snapshot is not None:
            restored = _snap.loads(self.spec, snapshot)
            if any(v.shape != s.shape_for(1) for s in self.spec.states for v in [restored[s.name]]):
                raise SnapshotError("snapshot: holds several streams; a pool member takes a one-stream snapshot")
            steps = _snap.steps_of(snapshot)
        position = int(self._bound.positions(restored)[0]) if restored is not None and self._bound else 0
        slot = len(self._sid_at)
        if slot >= self._arena.capacity:
            grown = max(2 * self._arena.capacity, slot + 1)
            grown = min(grown, self.capacity) if self.capacity is not None else grown
            try:
                self._resize(grown)
            except MemoryError:
                raise CapacityError(f"pool: cannot grow to {grown} slots ({len(self)} streams): out of memory") from None
            self.resizes["grow"] += 1
        if restored is not None:
            self._arena.write([slot], restored)
        else:
            self._arena.reset([slot])
        sid = next(self._ids) if sid is None else sid
        self._slot[sid] = slot
        self._sid_at.append(sid)
        self._steps[sid] = steps
        self._pos[sid] = position
        return sid

    open = join

    def leave(self, sid: int) -> None:
        """Remove a stream; its slot is reused (the last live stream moves into it to keep slots packed)."""
        slot = self._slot_of(sid)
        last = len(self._sid_at) - 1
        if slot != last:
            moved = self._sid_at[last]
            self._arena.move(last, slot)
            self._sid_at[slot] = moved
            self._slot[moved] = slot
        self._sid_at.pop()
        del self._slot[sid]
        del self._steps[sid], self._pos[sid]
        if len(self._sid_at) <= self._arena.capacity >> 2:
            self.trim()

    def reset(self, sid: int) -> None:
        self._arena.reset([self._slot_of(sid)])
        self._steps[sid] = self._pos[sid] = 0

    def check_context(self, sid: int, inputs: Mapping[str, np.ndarray], where: str = "") -> None:
        """``ContextLengthError`` if ``inputs`` would take stream ``sid`` past the context capacity (a server
        checks each job before batching it, so one session's overflow never fails another's step)."""
        if self._bound is not None:
            self._slot_of(sid)
            self._bound.check(self._pos[sid], inputs, where)

    def position(self, sid: int) -> int:
        """Tokens stream ``sid`` holds (a language model with a context bound; 0 otherwise)."""
        self._slot_of(sid)  # the one error for an unknown stream
        return self._pos[sid]

    def state(self, sid: int) -> Mapping[str, np.ndarray]:
        return _freeze(self._arena.read([self._slot_of(sid)]))

    def snapshot(self, sid: int) -> bytes:
        """The stream's working memory, in the same format as ``Stream.snapshot`` (batch 1)."""
        return _snap.dumps(self.spec, self._arena.read([self._slot_of(sid)]), {"steps": self._steps[sid]},
                           self._pos[sid] if self._bound else None)

    # ---- stepping -------------------------------------------------------------------------------------
    def step(self, requests: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, np.ndarray]]:
        """Step the streams in ``requests`` (sid -> inputs with a batch axis of 1); return sid -> outputs.

        All-or-nothing: every request is checked before any engine call, so a bad input steps no stream; and if
        one of several engine calls (one per chunk shape) fails, the others' streams are rolled back.
        """
        calls, advance = self.plan(requests)  # then one engine call each, rolled back together if one fails
        return self.settle(calls, run_calls(calls), advance)

    def plan(self, requests: Mapping[int, Mapping[str, Any]]) -> tuple[list[Call], dict[int, int]]:
        """Check every request and group them into engine calls, running nothing: (calls, tokens each stream
        advances). A tiered pool runs the calls of all its tiers at once (``pooling.run_calls``), then settles."""
        groups: dict[tuple, list[tuple[int, int, dict[str, np.ndarray]]]] = {}
        advance: dict[int, int] = {}
        for sid, inputs in requests.items():
            slot = self._slot_of(sid)
            feeds, _ = check_inputs(self.spec, inputs, 1, where=f"stream {sid}: ")
            if self._bound is not None:  # refused before any engine call: the whole step, every stream as it was
                advance[sid] = self._bound.check(self._pos[sid], feeds, f"stream {sid}: ")
            key = tuple(a.shape for a in feeds.values())
            groups.setdefault(key, []).append((slot, sid, feeds))
        cap = self.spec.max_batch  # a graph with a fixed batch (meta.max_batch): at most that many per call
        if cap is not None:
            groups = {(key, i): ms[i:i + cap] for key, ms in groups.items() for i in range(0, len(ms), cap)}
        if self._bound is not None:  # GroupQueryAttention: a multi-token call of streams with a past is one stream
            groups = self._bound.split(groups, self._pos)
        calls = []
        for members in groups.values():
            members.sort(key=lambda m: m[0])
            first, last = members[0][0], members[-1][0]
            contiguous = last - first == len(members) - 1
            slots: Any = range(first, last + 1) if contiguous else np.asarray([m[0] for m in members], np.intp)
            feeds = members[0][2] if len(members) == 1 else {
                t.name: np.concatenate([m[2][t.name] for m in members], axis=t.batch_axis) for t in self.spec.inputs}
            calls.append(Call(self.model.backend, self._arena, members, slots, feeds))
        return calls, advance

    def settle(self, calls: list[Call], outs: list[dict[str, np.ndarray]], advance: Mapping[int, int]
               ) -> dict[int, dict[str, np.ndarray]]:
        """After :meth:`plan`'s calls ran: each stream's outputs, its step count and position moved on."""
        results: dict[int, dict[str, np.ndarray]] = {}
        for call, out in zip(calls, outs):
            n = len(call.members)
            split = {t.name: rows_of(out[t.name], t.batch_axis, n) for t in self.spec.outputs}
            for i, (_, sid, _) in enumerate(call.members):
                results[sid] = {name: rows[i] for name, rows in split.items()}
                self._steps[sid] += 1
        for sid, t in advance.items():
            self._pos[sid] += t
        if self._low_since is not None:
            self.trim()
        return results

    def __repr__(self) -> str:
        limit = "no limit" if self.capacity is None else f"limit {self.capacity}"
        return f"StreamPool({len(self)} streams, {self.allocated} slots allocated, {limit})"
