"""Where sessions live between steps: the protocol the session table writes through, and how ``--persist``
picks one.

Two implementations:

* :class:`LocalStore` — the embedded crash-safe state log of one process (``--persist DIR``, see
  :mod:`.persist`). Nobody else writes it, so whatever this process holds in memory is the latest state.
* :class:`~.redis_store.RedisStore` — Redis shared by several replicas (``--persist redis://HOST:PORT/DB``).
  Other replicas write it too, so every write is *conditional*: it names the version of the state it was
  computed from, and the store refuses it (atomically) when another replica has moved the session on since.

The table never looks at versions itself: a store remembers the version of the state that this process
read or wrote last, per key, and :meth:`SessionStore.append` answers the set of keys whose write it
refused (*stale*). The caller then drops its resident copy; the next :meth:`read` of a stale key returns
the latest state (the refusal already carried it: no extra round trip) and the step is redone on it.
"""
from __future__ import annotations

from typing import Protocol

from ..errors import WmdeployError
from .persist import PersistError, StateLog

#: how often a step (or reset) is redone on the latest state after another replica wrote it first, before
#: the client gets a 409; contention between replicas on one session is rare with hashing balancers
RETRIES = 8


class StoreConflict(WmdeployError):
    """Another replica kept writing the same session first (answered 409: retry)."""


class StoreUnavailable(PersistError):
    """The shared store cannot be reached (answered 503, naming the store)."""


class SessionStore(Protocol):
    """What :class:`~.sessions.SessionTable` and the batcher need from ``--persist``. One writer thread."""

    #: how errors and logs name the store ("--persist DIR" / "--persist redis://host:port/db")
    where: str
    #: other processes write it too: writes are conditional, a resident copy may be stale
    shared: bool

    def __contains__(self, key: object) -> bool: ...

    def keys(self) -> list[str]: ...

    def count(self) -> int: ...

    def read(self, key: str) -> bytes | None:
        """The latest snapshot of ``key`` (None if absent); remembers its version for the next write."""
        ...

    def append(self, records: list[tuple[str, bytes | None]]) -> set[str] | None:
        """Write every (key, snapshot or None = delete) at once, durable on return; the keys whose write
        was refused because another process wrote them first (None or empty: all written)."""
        ...

    def create(self, key: str, blob: bytes) -> bool:
        """Write a new session atomically; False if the key already exists (nothing written)."""
        ...

    def remove(self, key: str) -> None:
        """Delete ``key`` whatever its version (DELETE /v1/sessions/{id})."""
        ...

    def overwrite(self, key: str) -> None:
        """The next write of ``key`` holds a state that does not derive from the stored one (a sequence
        start): write it whatever the stored version."""
        ...

    def current(self, key: str) -> bool:
        """Whether the state this process last read or wrote for ``key`` is still the latest."""
        ...

    def close(self) -> None: ...


class LocalStore(StateLog):
    """The local state log as a :class:`SessionStore`: one process owns it, so nothing is ever stale."""

    shared = False

    @property
    def where(self) -> str:
        return f"--persist {self.dir}"

    def count(self) -> int:
        return len(self.keys())

    def create(self, key: str, blob: bytes) -> bool:
        # the table checked that the key is free: only this process writes the log
        self.append([(key, blob)])
        return True

    def remove(self, key: str) -> None:
        self.append([(key, None)])

    def current(self, key: str) -> bool:
        return True

    def overwrite(self, key: str) -> None:
        pass  # nothing is conditional here
