"""The session table: which session key lives in which ``StreamPool`` slot, its LRU order, TTL and persistence.

Touched only by the engine thread (see :mod:`.batcher`), like the pool it owns, so it needs no locks.

A session is *resident* (it has a pool stream) or, with ``--persist``, *on disk* only (its latest snapshot
is in the :class:`~.persist.StateLog`). With ``--persist`` every acknowledged change (create, step, reset)
is already in the log before it is answered, so evicting a session is free (it just leaves the pool) and
restoring it is a ``pool.join(snapshot)`` on its next request. Without ``--persist`` an evicted session
is gone, and the server says so (and why) when the client comes back, instead of a bare "unknown".

With a *shared* store (``--persist redis://...``, :mod:`.redis_store`) other replicas step the same
sessions, so a resident copy may be stale. Steps stay optimistic (with affinity they read nothing): the
store refuses a write computed from an old version and the batcher redoes the step on the latest state.
Create, reset, snapshot and info check with the store (one round trip) instead of trusting the copy here.

Ownership (``--api-key``): a session's key in this table (and in the state log) is ``OWNER + "\0" + id``,
where OWNER is a fingerprint of the API key that made it (:func:`owner_of_key`). A request can only name
keys in its own namespace, so another tenant's session is not merely forbidden but *absent*: it answers
exactly like an id that was never created (404, same body), and creating the same id under two keys
makes two sessions, so that not even a 409 reveals that the other exists. Client ids never hold "\0".
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from .. import snapshot as _snap
from ..errors import CapacityError, SnapshotError, WmdeployError
from ..streaming import Model
from .metrics import Metrics
from .store import RETRIES, SessionStore, StoreConflict

log = logging.getLogger("wmdeploy.serve")
_FORGET_MAX = 10_000  # evicted keys remembered (without --persist) to explain a later 404


SEP = "\0"


def owner_of_key(api_key: bytes) -> str:
    """A stable, non-reversible tenant name for an API key: the state log stores this, never the key."""
    return hashlib.sha256(b"wmdeploy-session-owner" + SEP.encode() + api_key).hexdigest()[:16]


def scoped(owner: str, cid: str) -> str:
    """The table key of client id ``cid`` for tenant ``owner`` ("" without --api-key)."""
    return f"{owner}{SEP}{cid}" if owner else cid


def display(key: str) -> str:
    """The id a client knows (errors and answers never show the owner part)."""
    return key.rpartition(SEP)[2]


def owner_of(key: str) -> str:
    return key.partition(SEP)[0] if SEP in key else ""


def _snapshot_steps(blob: bytes) -> int:
    """The step count in a snapshot's meta; a client's snapshot is checked here, since a bad one that
    failed inside ``pool.join`` would fail after its slot was taken (a leaked slot and a 500)."""
    try:
        steps = _snap.meta(blob).get("steps", 0)
    except (TypeError, ValueError):
        raise SnapshotError("snapshot: its header's 'meta' is not an object") from None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise SnapshotError(f"snapshot: meta.steps {str(steps)[:20]!r}, expected a step count >= 0")
    return steps


class UnknownSession(WmdeployError):
    """A session or sequence id that this server does not hold."""


class SessionExists(WmdeployError):
    """Creating a session under an id that is already in use."""


@dataclass
class Session:
    key: str
    sid: int
    steps: int
    last_used: float


class SessionTable:
    """Resident sessions in LRU order (oldest first), plus the persisted ones in ``log``."""

    def __init__(self, model: Model, capacity: int, ttl: float | None, log_: SessionStore | None,
                 metrics: Metrics, max_bytes: int | None = None) -> None:
        self.model, self.capacity, self.ttl, self.log, self.metrics = model, capacity, ttl, log_, metrics
        # capacity is the pool's limit, not an allocation: its arena grows with the resident sessions; with a
        # dynamic KV capacity each session's stream sits in the smallest tier that holds its context (pooling)
        self.pool = model.pool(capacity, max_bytes=max_bytes)
        self.max_bytes = max_bytes
        self.live: OrderedDict[str, Session] = OrderedDict()
        self.forgotten: OrderedDict[str, str] = OrderedDict()
        # sessions of one request (an OpenAI completion): resident only, never written to the store, never
        # evicted or listed; opened with open_ephemeral and closed with close_ephemeral by their request
        self.ephemeral: set[str] = set()

    # ---- lookups ------------------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        if self.log is not None and self.log.shared:
            return key in self.log  # a resident copy may be a stale one of a session deleted elsewhere
        return key in self.live or (self.log is not None and key in self.log)

    def count_on_disk(self) -> int:
        """Sessions held only in the log (evicted, or not yet touched since a restart)."""
        if self.log is not None and self.log.shared:  # every replica's sessions: no listing per scrape
            return max(0, self.log.count() - len(self.live))
        return 0 if self.log is None else sum(1 for k in self.log.keys() if k not in self.live)

    def active_count(self, within_s: float) -> int:
        """Resident sessions used in the last ``within_s`` seconds (the LRU order ends with the newest)."""
        cutoff, n = time.monotonic() - within_s, 0
        for sess in reversed(self.live.values()):
            if sess.last_used < cutoff:
                break
            n += 1
        return n

    def count_persisted(self) -> int:
        return 0 if self.log is None else self.log.count()

    def _unknown(self, key: str, what: str) -> UnknownSession:
        why, shown = self.forgotten.get(key), display(key)
        if why:
            return UnknownSession(f"{what} '{shown}': {why}; start it again")
        hint = "; begin it with sequence_start=true" if what == "sequence" else "; create it with POST /v1/sessions"
        return UnknownSession(f"{what} '{shown}': unknown{hint}")

    # ---- residency ----------------------------------------------------------------------------------
    def _make_room(self, busy: set[str]) -> None:
        """Free a slot: evict the least-recently-used idle session if it is past its TTL, else refuse."""
        if len(self.pool) < self.capacity:
            return
        now = time.monotonic()
        for key, sess in self.live.items():  # oldest first
            if key in busy or key in self.ephemeral:  # a request in flight holds its ephemeral session
                continue
            # a shared store holds every session: a resident copy is only a cache (and may be a stale copy
            # of a session that another replica deleted), so the least recently used one can always go
            cache_only = self.log is not None and self.log.shared
            if cache_only or (self.ttl is not None and now - sess.last_used >= self.ttl):
                self.evict(key, "capacity")
                return
            break  # the LRU idle session is younger than the TTL: so is every other
        ttl = "no --session-ttl is set" if self.ttl is None else f"none has been idle for --session-ttl {self.ttl:g} s"
        raise CapacityError(f"server: all {self.capacity} sessions are live (--max-sessions {self.capacity}) and "
                            f"{ttl}; end or delete a session, or retry later")

    def _join(self, key: str, snapshot: bytes | None, busy: set[str]) -> Session:
        steps = _snapshot_steps(snapshot) if snapshot is not None else 0  # before the pool holds a slot for it
        self._make_room(busy)
        sid = self._within_memory(lambda: self.pool.join(snapshot), busy)
        sess = Session(key, sid, steps, time.monotonic())
        self.live[key] = sess
        self.forgotten.pop(key, None)
        return sess

    def _within_memory(self, act: Callable[[], Any], busy: set[str]) -> Any:
        """``act()`` (a join, or a move to a larger KV tier); at the memory budget (--max-memory) evict idle
        sessions, oldest first, until it fits: any idle one with --persist (its state is in the store), else only
        those past --session-ttl. ``CapacityError`` (429) naming the budget when none can go."""
        while True:
            try:
                return act()
            except CapacityError:
                if self.max_bytes is None or not self._evict_idle(busy):
                    raise

    def _evict_idle(self, busy: set[str]) -> bool:
        now = time.monotonic()
        for key, sess in self.live.items():  # oldest first
            if key in busy or key in self.ephemeral:
                continue
            if self.log is None and (self.ttl is None or now - sess.last_used < self.ttl):
                return False  # not stored, and the oldest idle one is younger than the TTL: so is every other
            self.evict(key, "memory")
            return True
        return False

    def fit(self, sess: Session, feeds: dict[str, Any], busy: set[str]) -> None:
        """Before a step: move the session's stream to the KV capacity tier the step needs (memory budget as
        for a join), so that a refusal is this session's 429, never its batch's."""
        fit = getattr(self.pool, "fit", None)
        if fit is not None:
            self._within_memory(lambda: fit(sess.sid, feeds), busy)

    def resident(self, key: str, what: str = "session", busy: set[str] | None = None) -> Session:
        """The session, restored from the log into the pool if it was evicted; raises if unknown."""
        sess = self.live.get(key)
        if sess is None:
            blob = self.log.read(key) if self.log is not None else None
            if blob is None:
                raise self._unknown(key, what)
            sess = self._join(key, blob, busy or {key})
            self.metrics.restored()
            log.info("restored", extra={"event": "restore", "session": display(key), "owner": owner_of(key),
                                        "steps": sess.steps})
        return sess

    def touch(self, sess: Session) -> None:
        sess.last_used = time.monotonic()
        self.live.move_to_end(sess.key)

    def evict(self, key: str, reason: str) -> None:
        sess = self.live.pop(key)
        self.pool.leave(sess.sid)
        self.metrics.evicted(reason)
        if self.log is None:
            self.forgotten[key] = (f"was evicted after {self.ttl:g} s idle (--session-ttl) and the server has "
                                   "no --persist") if self.ttl is not None else "was evicted"
            while len(self.forgotten) > _FORGET_MAX:
                self.forgotten.popitem(last=False)
        log.info("evicted", extra={"event": "evict", "session": display(key), "owner": owner_of(key),
                                   "reason": reason, "persisted": self.log is not None})

    def drop_resident(self, key: str) -> None:
        """Forget the in-memory state (after a failed persist): the next request restores the durable one."""
        sess = self.live.pop(key, None)
        if sess is not None:
            self.pool.leave(sess.sid)

    def sweep(self) -> int:
        """Evict every resident session idle past the TTL; return how many. Then give back arena memory
        that most slots have left unused for a while (the pool's own hysteresis decides)."""
        if self.ttl is None:
            self.pool.trim()
            return 0
        cutoff, n = time.monotonic() - self.ttl, 0
        for key, sess in list(self.live.items()):  # oldest first
            if sess.last_used > cutoff:
                break
            if key not in self.ephemeral:  # its request closes it (a generation never idles that long)
                self.evict(key, "ttl")
                n += 1
        self.pool.trim()
        return n

    # ---- operations (each durable before it returns, with --persist) --------------------------------
    def _persist(self, records: list[tuple[str, bytes | None]]) -> set[str]:
        """Write through to the store; the keys it refused (a shared store: another replica was first)."""
        return (self.log.append(records) or set()) if self.log is not None else set()

    def _sync(self, key: str) -> None:
        """A shared store: drop the resident copy if another replica has moved the session on since."""
        if key in self.ephemeral:
            return  # only here, never in the store
        if self.log is not None and self.log.shared and key in self.live and not self.log.current(key):
            self.drop_resident(key)

    def create(self, key: str, snapshot: bytes | None = None) -> dict[str, Any]:
        exists = SessionExists(f"session '{display(key)}': already exists; delete it first or step it")
        if self.log is not None and self.log.shared:
            self.drop_resident(key)  # the shared store alone says (atomically) whether the id is taken
        elif key in self:
            raise exists
        sess = self._join(key, snapshot, {key})
        try:
            made = self.log is None or self.log.create(key, self.pool.snapshot(sess.sid))
        except Exception:
            self.drop_resident(key)
            raise
        if not made:
            self.drop_resident(key)
            raise exists
        return self.info(key)

    def open_ephemeral(self, key: str, snapshot: bytes | None = None) -> Session:
        """A session for one request, from ``snapshot`` (a prompt-cache hit) or the initial state: resident
        only (steps are not persisted), 429 at ``--max-sessions`` like any other session."""
        if key in self.live:
            raise SessionExists(f"session '{display(key)}': already exists")
        sess = self._join(key, snapshot, {key})
        self.ephemeral.add(key)
        return sess

    def close_ephemeral(self, key: str) -> None:
        self.ephemeral.discard(key)
        self.drop_resident(key)

    def start(self, key: str, busy: set[str]) -> Session:
        """A sequence (re)start: the initial state, whatever was there before (no state leaks)."""
        sess = self.live.get(key)
        if sess is None:
            return self._join(key, None, busy)
        self.pool.reset(sess.sid)
        sess.steps = 0
        return sess

    def reset(self, key: str) -> dict[str, Any]:
        for _ in range(RETRIES):
            sess = self.resident(key)
            self.pool.reset(sess.sid)
            sess.steps = 0
            self.touch(sess)
            if not self._persist([(key, self.pool.snapshot(sess.sid))]):
                return self.info(key)
            self.drop_resident(key)  # a shared store: another replica wrote it first; reset the latest
        raise StoreConflict(f"session '{display(key)}': other replicas kept stepping it during the reset; retry")

    def delete(self, key: str) -> None:
        if key not in self:
            self.drop_resident(key)  # a shared store: a stale copy of a session deleted elsewhere
            raise self._unknown(key, "session")
        self.drop_resident(key)
        if self.log is not None:
            self.log.remove(key)

    def snapshot(self, key: str) -> bytes:
        self._sync(key)
        sess = self.live.get(key)
        if sess is not None:
            return self.pool.snapshot(sess.sid)
        blob = self.log.read(key) if self.log is not None else None
        if blob is None:
            raise self._unknown(key, "session")
        return blob

    def info(self, key: str) -> dict[str, Any]:
        self._sync(key)
        sess = self.live.get(key)
        if sess is not None:
            return {"id": display(key), "steps": sess.steps, "resident": True,
                    "idle_s": round(time.monotonic() - sess.last_used, 3)}
        blob = self.snapshot(key)
        return {"id": display(key), "steps": int(_snap.meta(blob).get("steps", 0)), "resident": False}

    def keys(self, owner: str | None = None) -> list[str]:
        """Table keys (resident first, then persisted); with ``owner``: that tenant's client ids only."""
        if self.log is not None and self.log.shared:  # the store's list: not the copies resident here
            stored = self.log.keys()
            known = set(stored)
            every = [k for k in self.live if k in known] + [k for k in stored if k not in self.live]
        else:
            on_disk = [] if self.log is None else [k for k in self.log.keys() if k not in self.live]
            every = [k for k in self.live if k not in self.ephemeral] + on_disk
        return every if owner is None else [display(k) for k in every if owner_of(k) == owner]
