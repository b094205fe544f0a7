"""The backend protocol: the small surface between ``Stream``/``StreamPool`` and an execution engine.

Modelled on Polygraphy's runners: a backend is built from a model file and a spec, runs one step of the
graph on a batch, and is closed. It knows nothing of streams, sessions, snapshots or HTTP.

What makes it a *streaming* protocol is the :class:`StateArena`: the backend allocates the working memory
of ``capacity`` streams wherever it likes (host numpy buffers for ONNX Runtime on CPU; device buffers for
CUDA or TensorRT later), addressed by slot. ``Backend.run(arena, slots, feeds)`` steps the streams in
``slots`` (batch order = slot order given) and advances their state *inside the arena*; state reaches the
host only on :meth:`StateArena.read` (snapshots, ``Stream.state``). So a device backend keeps state
resident and ``Stream``/``StreamPool`` never change when one is added.

Slots are given either as a ``range`` (a contiguous run of slots, which a backend may bind as a view with
no gather/scatter) or as a 1-D int array (any slots; the backend gathers and scatters).

Two optional parts of the arena protocol (both have defaults here, so an arena that only implements the
four abstract methods still works, just slower):

* **Growth** (``resize(capacity, keep)``): a ``StreamPool`` keeps its live streams in slots ``0..n-1`` and
  asks its arena to grow geometrically as streams join and to shrink when most slots stay empty, so
  memory follows the live streams, not the pool's limit. An arena reallocates its buffers *contiguous*
  at the new capacity (the view binding of slot runs keeps working), copies slots ``0..keep-1`` bit for
  bit, and starts the others at the initial state. Without ``resize`` (the default raises
  ``NotImplementedError``) the pool falls back to a new ``Backend.arena`` and a host round trip of the kept
  slots through ``read``/``write``. ``nbytes`` is what the arena holds (for ``/metrics``).
* **Undo** (``checkpoint``/``rollback``/``commit``): a pool step with several chunk lengths makes one
  engine call per length; if a later call fails, the streams of the earlier ones must not have moved.
  The pool takes ``checkpoint(slots)`` of the earlier groups before the second call, and ``rollback`` or
  ``commit`` after. Between the two, each checkpointed slot is run at most once and nothing else touches
  it. The default copies the states to the host (``read``) and writes them back (``write``); a ping-pong
  arena just remembers which buffer was live (the old state is still in the other one), for free.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from wmdeploy.contract import StreamingSpec

Slots = range | Sequence[int] | np.ndarray


class StateArena(ABC):
    """Working memory for ``capacity`` streams, owned by a backend. Slot ``i`` is one stream's state."""

    capacity: int

    @abstractmethod
    def read(self, slots: Slots) -> dict[str, np.ndarray]:
        """Host copies of the states at ``slots`` (batch axis of size ``len(slots)``), keyed by state name."""

    @abstractmethod
    def write(self, slots: Slots, states: Mapping[str, np.ndarray]) -> None:
        """Overwrite the states at ``slots`` with host arrays (batch axis of size ``len(slots)``)."""

    @abstractmethod
    def reset(self, slots: Slots) -> None:
        """Put the states at ``slots`` back to the spec's initial values."""

    @abstractmethod
    def move(self, src: int, dst: int) -> None:
        """Copy the state of slot ``src`` into slot ``dst`` (used to keep a pool's live slots packed)."""

    #: bytes of state memory this arena holds (all its buffers); 0 where an arena does not say
    nbytes: int = 0

    def resize(self, capacity: int, keep: int) -> None:
        """Reallocate for ``capacity`` slots (contiguous); slots ``0..keep-1`` keep their states bit for bit
        (``keep <= min(old, new capacity)``), the others start at the initial values. All-or-nothing: if
        the new memory cannot be had, raise and leave the arena as it was. Cached bindings into the old
        buffers must be dropped. ``NotImplementedError`` (the default) makes the pool copy through the host.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot resize in place")

    def checkpoint(self, slots: Slots) -> Any:
        """A token that lets :meth:`rollback` undo the next run of each of ``slots`` (see module doc)."""
        idx = np.arange(slots.start, slots.stop) if isinstance(slots, range) else np.asarray(slots, np.intp)
        return idx, self.read(idx)

    def rollback(self, token: Any) -> None:
        """Put the checkpointed slots back to their states at :meth:`checkpoint`; closes the checkpoint."""
        idx, states = token
        self.write(idx, states)

    def commit(self, token: Any) -> None:
        """Close a checkpoint without undoing anything."""


class Backend(ABC):
    """One loaded model on one device. Lifecycle: construct (load), ``arena``/``run`` many times, ``close``.

    Constructor: ``Backend(path, spec_or_None, device, **options)``; with ``None`` the backend reads the
    spec from the model file itself (so the file is parsed once, by the engine).
    """

    #: registry name, e.g. ``"onnxruntime"``
    name: ClassVar[str]
    #: devices this backend can drive, e.g. ``("cpu",)``
    devices: ClassVar[tuple[str, ...]]

    spec: StreamingSpec
    path: Path
    device: str
    #: whether :meth:`arena` takes ``context`` (a capacity tier of a file whose graph leaves its context axes
    #: dynamic, ``spec.context_dim``); a pool keeps every stream at the file's full capacity where it does not
    context_tiers: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def available(cls, device: str) -> tuple[bool, str]:
        """Whether this backend can run on ``device`` here, and why (or why not), in a short phrase."""

    @abstractmethod
    def arena(self, capacity: int) -> StateArena:
        """Allocate working memory for ``capacity`` streams, every slot at the initial state (backends with
        :attr:`context_tiers` also take ``context=N``: the states of ``spec.at_context(N)``)."""

    @abstractmethod
    def run(self, arena: StateArena, slots: Slots, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One engine call: step the streams at ``slots`` with batched data ``feeds`` (already checked).

        Returns the data outputs as host arrays (batch axis in ``slots`` order); the states of ``slots``
        advance in ``arena``; other slots are untouched. All-or-nothing: if it raises, the states of
        ``slots`` are what they were before the call.
        """

    def file_metadata(self) -> dict[str, str]:
        """The model file's ``metadata_props`` (the spec, and what travels beside it: a tokenizer, a chat
        template). Engines that parsed the file already override this to answer without reading it again."""
        from wmdeploy.contract import read_metadata  # noqa: PLC0415

        return read_metadata(self.path)

    def describe(self) -> dict[str, Any]:
        """Facts for ``inspect``/``profile``: providers, threads, ... (free-form)."""
        return {"backend": self.name, "device": self.device}

    def close(self) -> None:
        """Release the engine. Further calls are undefined."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
