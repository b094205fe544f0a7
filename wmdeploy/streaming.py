"""The streaming runtime: ``load`` a model, step ``Stream`` s, or step many streams at once in a ``StreamPool``.

Torch-free: numpy + a backend from :mod:`wmdeploy.runtimes` (ONNX Runtime on CPU so far). ``Stream`` and
``StreamPool`` own the state's *lifecycle* (fresh, reset, snapshot, restore, join, leave); the backend
owns the state's *memory* (a :class:`~wmdeploy.runtimes.base.StateArena`) and advances it in place, so
neither class ever looks inside a backend, and state reaches Python only for ``state`` and snapshots.

Pool inputs carry a batch axis of size 1, exactly as ``Stream.step`` takes them for a one-stream
``Stream``, so a stream can move between a ``Stream`` and a pool (via snapshots) with the same arrays.

Chunks of different lengths in one pool step: the pool groups the stepping streams by the shapes of
their inputs and makes one engine call per distinct shape. Padding to the longest chunk with a mask is
not an option for a generic ONNX graph: it has no mask input, so the padded steps would run through the
recurrence and change the state (an LSTM fed three pad frames is not the LSTM after the real frames).
Grouping is exact for every model; its cost is one extra engine call per extra distinct length (measured
in ``bench/bench_runtime.py``; with the usual batched-matmul costs, G groups of n/G streams cost about
G calls of the per-call overhead more than one call of n streams). Within one call streams never mix:
each output row and state slot belongs to exactly one stream.

Not thread-safe: use one ``Stream``/``StreamPool`` per thread (the backend's session itself is shared).
"""
from __future__ import annotations

import itertools
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from . import snapshot as _snap
from ._inputs import check_inputs
from .contract import StreamingSpec
from .errors import CapacityError, InputError, SnapshotError
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

    def pool(self, capacity: int) -> "StreamPool":
        """Room for ``capacity`` streams stepped together, one engine call per distinct chunk shape."""
        return StreamPool(self, capacity)

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
        restored = None
        if snapshot is not None:
            restored = _snap.loads(self.spec, snapshot)  # every check before any allocation
            if self.spec.states:
                first = self.spec.states[0]
                batch = restored[first.name].shape[first.batch_axis]
        if batch < 1:
            raise InputError(f"stream batch {batch}: expected at least 1")
        self.batch = batch
        self._slots = range(0, batch)
        self._arena: StateArena = model.backend.arena(batch)
        self.steps = 0
        if restored is not None:
            self._arena.write(self._slots, restored)
            self.steps = int(_snap.meta(snapshot).get("steps", 0))

    def step(self, **inputs: Any) -> dict[str, np.ndarray]:
        """Feed one chunk; return the data outputs. The state advances only if the step succeeds."""
        feeds, _ = check_inputs(self.spec, inputs, self.batch)
        out = self.model.backend.run(self._arena, self._slots, feeds)
        self.steps += 1
        return out

    def reset(self) -> None:
        """Back to the initial state (a new conversation)."""
        self._arena.reset(self._slots)
        self.steps = 0

    @property
    def state(self) -> Mapping[str, np.ndarray]:
        """A read-only copy of the working memory (state name -> array); reads it back from the backend."""
        return _freeze(self._arena.read(self._slots))

    def snapshot(self) -> bytes:
        """The working memory as self-checking bytes; resume with ``model.stream(snapshot=...)``."""
        return _snap.dumps(self.spec, self._arena.read(self._slots), {"steps": self.steps})

    def __repr__(self) -> str:
        return f"Stream(batch={self.batch}, steps={self.steps})"


def _rows(arr: np.ndarray, axis: int, n: int) -> list[np.ndarray]:
    """Split ``arr`` into ``n`` views of size 1 along ``axis`` (no copies)."""
    if axis == 0:
        return [arr[i:i + 1] for i in range(n)]
    lead = (slice(None),) * axis
    return [arr[lead + (slice(i, i + 1),)] for i in range(n)]


class StreamPool:
    """Up to ``capacity`` streams, each with its own working memory, stepped in batched engine calls.

    Stream ids (``sid``) are ints handed out by :meth:`join` and never reused. Live streams are kept in
    the arena's first ``len(pool)`` slots (a leaving stream's slot takes the last one), so that when every
    stream steps, the backend binds the arena directly with no gather or scatter where the state layout
    allows it. Streams absent from a step keep their state untouched.
    """

    def __init__(self, model: Model, capacity: int) -> None:
        if capacity < 1:
            raise CapacityError(f"pool capacity {capacity}: expected at least 1")
        self.model, self.spec, self.capacity = model, model.spec, capacity
        self._arena: StateArena = model.backend.arena(capacity)
        self._slot: dict[int, int] = {}  # sid -> slot
        self._sid_at: list[int] = []  # slot -> sid, packed
        self._steps: dict[int, int] = {}
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._sid_at)

    def __contains__(self, sid: object) -> bool:
        return sid in self._slot

    @property
    def sids(self) -> list[int]:
        return list(self._sid_at)

    def _slot_of(self, sid: int) -> int:
        try:
            return self._slot[sid]
        except (KeyError, TypeError):
            raise InputError(f"stream {sid!r}: not in this pool (it left, or was never joined)") from None

    def join(self, snapshot: bytes | None = None) -> int:
        """Add a stream (fresh, or resumed from a one-stream snapshot); return its id."""
        if len(self._sid_at) >= self.capacity:
            raise CapacityError(f"pool: all {self.capacity} slots are taken; leave a stream or make a bigger pool")
        restored = _snap.loads(self.spec, snapshot) if snapshot is not None else None
        if restored and any(v.shape != s.shape_for(1) for s in self.spec.states for v in [restored[s.name]]):
            raise SnapshotError("snapshot: holds several streams; a pool member takes a one-stream snapshot")
        slot, sid = len(self._sid_at), next(self._ids)
        if restored is not None:
            self._arena.write([slot], restored)
        else:
            self._arena.reset([slot])
        self._slot[sid] = slot
        self._sid_at.append(sid)
        self._steps[sid] = int(_snap.meta(snapshot).get("steps", 0)) if snapshot is not None else 0
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
        del self._steps[sid]

    def reset(self, sid: int) -> None:
        self._arena.reset([self._slot_of(sid)])
        self._steps[sid] = 0

    def state(self, sid: int) -> Mapping[str, np.ndarray]:
        return _freeze(self._arena.read([self._slot_of(sid)]))

    def snapshot(self, sid: int) -> bytes:
        """The stream's working memory, in the same format as ``Stream.snapshot`` (batch 1)."""
        return _snap.dumps(self.spec, self._arena.read([self._slot_of(sid)]), {"steps": self._steps[sid]})

    def step(self, requests: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, np.ndarray]]:
        """Step the streams in ``requests`` (sid -> inputs with a batch axis of 1); return sid -> outputs.

        Every request is checked before any engine call, so a bad input steps no stream at all.
        """
        groups: dict[tuple, list[tuple[int, int, dict[str, np.ndarray]]]] = {}
        for sid, inputs in requests.items():
            slot = self._slot_of(sid)
            feeds, _ = check_inputs(self.spec, inputs, 1, where=f"stream {sid}: ")
            key = tuple(a.shape for a in feeds.values())
            groups.setdefault(key, []).append((slot, sid, feeds))
        results: dict[int, dict[str, np.ndarray]] = {}
        backend = self.model.backend
        for members in groups.values():
            members.sort(key=lambda m: m[0])
            slots_list = [m[0] for m in members]
            n = len(members)
            contiguous = slots_list[-1] - slots_list[0] == n - 1
            slots: Any = range(slots_list[0], slots_list[-1] + 1) if contiguous else np.asarray(slots_list, np.intp)
            if n == 1:
                feeds = members[0][2]
            else:
                feeds = {t.name: np.concatenate([m[2][t.name] for m in members], axis=t.batch_axis)
                         for t in self.spec.inputs}
            outs = backend.run(self._arena, slots, feeds)
            split = {t.name: _rows(outs[t.name], t.batch_axis, n) for t in self.spec.outputs}
            for i, (_, sid, _) in enumerate(members):
                results[sid] = {name: rows[i] for name, rows in split.items()}
                self._steps[sid] += 1
        return results

    def __repr__(self) -> str:
        return f"StreamPool({len(self)}/{self.capacity} streams)"
