"""Sessions shared by ``wmdeploy serve`` replicas through Redis (``--persist redis://HOST:PORT/DB``).

Layout, under a namespace per model name (``wm:{name}:``; replicas of one model share it)::

    wm:{name}:s:{key}   hash  v = version, s = snapshot bytes
    wm:{name}:index     set   every session key (SCARD for the gauge, SMEMBERS for the listing)

**No forks** (two replicas must never both apply a step to the same base state): every write is one Lua
script that compares the session's stored version with the version this replica's state was computed
from, and writes only if they are equal (else it answers the latest version and snapshot, so the loser can
redo its step on them without another round trip). A script runs atomically in Redis, so check and write
cannot interleave with another replica's; WATCH/MULTI would need a read round trip before every write,
which affinity is meant to avoid.

**Versions are write ids**, never counters: ``{random 64-bit replica id}:{n}``, made by the writer. A
counter in Redis would go back in time when Redis loses its last writes (``appendfsync everysec`` and a
machine crash) and could then hand out a number that a replica still holds for another state; a write id
is never issued twice, so a stale replica is always refused, also after such a rollback. A session
deleted and created again never reuses a version either.

**One round trip per engine batch**: the scripts of all sessions stepped in one batch go in one MULTI/EXEC
pipeline, so a batch is also all-or-nothing in Redis (a connection lost before EXEC writes nothing).

**Retries are idempotent**: when the client library resends a batch whose reply was lost, a write that
already happened is recognised (the stored version is its own write id) and reported as done instead of
as a conflict (which would make the step run twice).

**Redis down**: every call fails fast (short timeouts, two quick reconnect attempts) with
:class:`~.store.StoreUnavailable` (503 naming the store); the connection pool reconnects by itself on
the next request once Redis is back, so replicas never need a restart.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
import time
from collections import OrderedDict
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .store import StoreUnavailable

log = logging.getLogger("wmdeploy.serve")
T = TypeVar("T")
_REMEMBER = 100_000  # versions remembered (LRU); forgetting one only costs a redo, never correctness
_FRESH_MAX = 4_096  # latest snapshots carried by refusals, kept until the redo reads them

# KEYS: session hash, index.  ARGV: expected version ("0": must not exist; "?": unknown, so always refused,
# which brings the latest; "*": whatever is stored, for a state that does not derive from it), snapshot ("" = delete), this write's id (the new version), index member (the
# key), TTL in ms ("0": none).  -> {1, version} written, {0, version, snapshot} refused (version "0": the
# session does not exist).
_CAS = """
local cur = redis.call('HGET', KEYS[1], 'v')
if cur and cur == ARGV[3] then return {1, cur} end
if ARGV[1] ~= '*' and (cur or '0') ~= ARGV[1] then
  if cur then return {0, cur, redis.call('HGET', KEYS[1], 's')} end
  return {0, '0'}
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[4])
  return {1, '0'}
end
redis.call('HSET', KEYS[1], 'v', ARGV[3], 's', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[4])
if ARGV[5] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[5]) end
return {1, ARGV[3]}
"""


# KEYS: index.  ARGV: the hash prefix, then index members.  Removes (atomically, so that a session written
# again meanwhile keeps its entry) the members whose hash Redis has expired; -> those members.
_PRUNE = """
local gone = {}
for i = 2, #ARGV do
  if redis.call('EXISTS', ARGV[1] .. ARGV[i]) == 0 and redis.call('SREM', KEYS[1], ARGV[i]) == 1 then
    gone[#gone + 1] = ARGV[i]
  end
end
return gone
"""
_PRUNE_BATCH = 1000  # index members looked at per expiry pass
_PRUNE_EVERY_S = 1.0


def redact(url: str) -> str:
    """The URL without its password (it ends up in error messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class RedisStore:
    """A :class:`~.store.SessionStore` in Redis, shared by replicas. One writer thread (the engine's);
    the gauges (:meth:`count`) may read from another thread (the client's pool is thread-safe)."""

    shared = True

    def __init__(self, url: str, namespace: str, *, ttl_s: float | None = None, timeout_s: float = 2.0) -> None:
        self.url = redact(url)
        self.where = f"--persist {self.url}"
        # URL query options (socket_timeout=..., etc.) override these defaults in redis-py
        self._r = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                       retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 2))
        ns = f"wm:{namespace}:".encode()
        self._prefix, self._index = ns + b"s:", ns + b"index"
        self._sha = hashlib.sha1(_CAS.encode()).hexdigest()
        self._ttl_ms = b"0" if ttl_s is None else str(max(1, int(ttl_s * 1000))).encode()
        self._version: OrderedDict[str, bytes] = OrderedDict()  # key -> version of the state held here
        self._fresh: OrderedDict[str, tuple[bytes | None, bytes | None]] = OrderedDict()  # from refusals
        self._writer = os.urandom(8).hex()  # versions are "{writer}:{n}": unique without a counter in Redis
        self._writes = itertools.count(1)
        self._cursor, self._prune_after = 0, 0.0  # where the expiry pass goes on in the index (SSCAN)
        self.round_trips = 0
        self._check_durability()

    # ---- plumbing -----------------------------------------------------------------------------------
    def _run(self, fn: Callable[[], T]) -> T:
        self.round_trips += 1
        try:
            return fn()
        except redis.exceptions.RedisError as exc:  # connection, timeout, LOADING, MISCONF, READONLY, OOM
            text = " ".join(str(exc).split()) or type(exc).__name__
            raise StoreUnavailable(f"{self.where}: the session store is unavailable ({text}); "
                                   "retry when it is back") from None

    def _skey(self, key: str) -> bytes:
        return self._prefix + key.encode()

    def _remember(self, key: str, version: bytes) -> None:
        self._version[key] = version
        self._version.move_to_end(key)
        while len(self._version) > _REMEMBER:
            self._version.popitem(last=False)

    def _check_durability(self) -> None:
        """Say at start whether an acknowledged step survives a Redis restart (AOF), and whether Redis is up."""
        try:
            aof = self._r.config_get("appendonly").get("appendonly")
            fsync = self._r.config_get("appendfsync").get("appendfsync")
        except redis.exceptions.ResponseError:  # CONFIG disabled (managed Redis): nothing to say
            return
        except redis.exceptions.RedisError as exc:
            log.warning("session store unreachable at start; requests get 503 until it is back",
                        extra={"event": "store_down", "store": self.url, "error": str(exc)})
            return
        if aof != "yes":
            log.warning("Redis runs without appendonly: acknowledged steps survive a replica, not a Redis restart",
                        extra={"event": "store_not_durable", "store": self.url})
        log.info("session store", extra={"event": "store", "store": self.url, "appendonly": aof,
                                          "appendfsync": fsync})

    # ---- reads --------------------------------------------------------------------------------------
    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self._run(lambda: self._r.exists(self._skey(key))))

    def keys(self) -> list[str]:
        members = self._run(lambda: self._r.smembers(self._index))
        keys = sorted(m.decode("utf-8", "replace") for m in members)
        if self._ttl_ms == b"0" or not keys:
            return keys
        # with a TTL, a session can expire while its index entry stays: prune those
        pipe = self._r.pipeline(transaction=False)
        for k in keys:
            pipe.exists(self._skey(k))
        alive = self._run(pipe.execute)
        gone = [k.encode() for k, a in zip(keys, alive) if not a]
        if gone:
            self._run(lambda: self._r.srem(self._index, *gone))
        return [k for k, a in zip(keys, alive) if a]

    def count(self) -> int:
        """Sessions in the store, every replica's; -1 while it is unreachable (read by /metrics)."""
        try:
            return int(self._run(lambda: self._r.scard(self._index)))
        except StoreUnavailable:
            return -1

    def read(self, key: str) -> bytes | None:
        fresh = self._fresh.pop(key, None)
        if fresh is None:
            version, blob = self._run(lambda: self._r.hmget(self._skey(key), "v", "s"))
        else:  # a refused write already brought the latest state
            version, blob = fresh
        if version is None or blob is None:
            self._remember(key, b"0")  # known to be absent: a create may follow
            return None
        self._remember(key, version)
        return blob

    def current(self, key: str) -> bool:
        mine = self._version.get(key)
        return mine is not None and self._run(lambda: self._r.hget(self._skey(key), "v")) == mine

    def expire(self, cutoff: float) -> list[str]:
        """``--persist-ttl``: Redis expires an idle session's hash itself (PEXPIRE on every write); this takes
        the expired ones out of the index, a batch per call (one SSCAN step), so that the index and the
        gauge do not keep every abandoned session forever. Returns the keys it removed (each counted once,
        whichever replica notices). ``cutoff`` is Redis's business here (the TTL is set on write)."""
        if self._ttl_ms == b"0" or time.monotonic() < self._prune_after:
            return []
        self._prune_after = time.monotonic() + _PRUNE_EVERY_S
        cursor, members = self._run(lambda: self._r.sscan(self._index, self._cursor, count=_PRUNE_BATCH))
        self._cursor = int(cursor)
        if not members:
            return []
        gone = self._run(lambda: self._r.eval(_PRUNE, 1, self._index, self._prefix, *members))
        keys = [m.decode("utf-8", "replace") for m in gone]
        for key in keys:
            self._version.pop(key, None)
            self._fresh.pop(key, None)
        return keys

    # ---- writes -------------------------------------------------------------------------------------
    def append(self, records: list[tuple[str, bytes | None]]) -> set[str]:
        if not records:
            return set()
        write_id = f"{self._writer}:{next(self._writes)}".encode()
        replies: list[Any] = self._run(lambda: self._transaction(records, write_id))
        stale: set[str] = set()
        for (key, blob), reply in zip(records, replies):
            if int(reply[0]) == 1:
                self._remember(key, reply[1])  # "0" after a delete: known to be absent
                self._fresh.pop(key, None)  # a state an earlier refusal carried is older than this write
                continue
            # the caller drops its copy; the redo reads the latest state (carried by the refusal: no round
            # trip), or writes over it (a sequence_start), so both need its version ("0": gone, a start
            # may recreate it)
            stale.add(key)
            self._remember(key, reply[1])
            self._fresh[key] = (reply[1], reply[2]) if reply[1] != b"0" else (None, None)
            while len(self._fresh) > _FRESH_MAX:
                self._fresh.popitem(last=False)
        return stale

    def _transaction(self, records: list[tuple[str, bytes | None]], write_id: bytes) -> list[Any]:
        """The conditional writes of one batch in one MULTI/EXEC: one round trip, all or nothing."""
        for attempt in (0, 1):
            pipe = self._r.pipeline(transaction=True)
            for key, blob in records:
                pipe.evalsha(self._sha, 2, self._skey(key), self._index,
                             self._version.get(key, b"?"), blob or b"", write_id, key.encode(), self._ttl_ms)
            try:
                return pipe.execute()
            except redis.exceptions.NoScriptError:  # a restarted Redis forgot the script: nothing ran
                if attempt:
                    raise
                self._r.script_load(_CAS)
        raise AssertionError("unreachable")

    def overwrite(self, key: str) -> None:
        """The next write of ``key`` is a sequence_start's: its state begins from the initial one, not from
        the stored one, so it is written whatever the stored version (else a start of an id this replica
        never read would always be refused once and computed twice)."""
        self._remember(key, b"*")

    def create(self, key: str, blob: bytes) -> bool:
        self._remember(key, b"0")  # expected version "0": only if no replica has it
        stale = self.append([(key, blob)])
        self._fresh.pop(key, None)
        return key not in stale

    def remove(self, key: str) -> None:
        skey = self._skey(key)

        def delete() -> None:
            pipe = self._r.pipeline(transaction=True)
            pipe.delete(skey)
            pipe.srem(self._index, key.encode())
            pipe.execute()

        self._run(delete)
        self._remember(key, b"0")
        self._fresh.pop(key, None)

    def close(self) -> None:
        self._r.close()
