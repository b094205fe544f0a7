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

    @classmethod
    @abstractmethod
    def available(cls, device: str) -> tuple[bool, str]:
        """Whether this backend can run on ``device`` here, and why (or why not), in a short phrase."""

    @abstractmethod
    def arena(self, capacity: int) -> StateArena:
        """Allocate working memory for ``capacity`` streams, every slot at the initial state."""

    @abstractmethod
    def run(self, arena: StateArena, slots: Slots, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One engine call: step the streams at ``slots`` with batched data ``feeds`` (already checked).

        Returns the data outputs as host arrays (batch axis in ``slots`` order); the states of ``slots``
        advance in ``arena``; other slots are untouched.
        """

    def describe(self) -> dict[str, Any]:
        """Facts for ``inspect``/``profile``: providers, threads, ... (free-form)."""
        return {"backend": self.name, "device": self.device}

    def close(self) -> None:
        """Release the engine. Further calls are undefined."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
