"""The working memory of recent conversations, kept between requests: the OpenAI routes' prompt cache.

Every chat turn re-sends the whole conversation. The server keeps the state reached after recent requests
(after the prompt, and after prompt + completion), keyed by exactly the tokens that state holds, and starts a
request from the longest stored sequence that is a prefix of its tokens: turn N prefills only what is new since
turn N-1. An entry is a snapshot (the same bytes as a session's: attention caches and conv/SSM states alike)
plus the logits of its last position, so that a request whose tokens are all cached can sample at once.

Tenants never share entries: the key is a hash of the API key's tenant and the token ids (a hit would
otherwise tell one tenant, by its speed, what another one sent).

Tiers: this process's memory (LRU, bounded by ``--prompt-cache-mb``), and with ``--persist`` the same store
as the sessions, so a replica behind a balancer finds what another one computed: a folder beside the state
log (``--persist DIR``), or Redis (``--persist redis://...``: keys ``wm:{model}:pc:{tenant}:{n}:{hash}`` with
a TTL, and per tenant the set of stored lengths, so that a lookup asks only for the prefix lengths that
exist). An entry this process evicts from memory is deleted from the shared tier too (the budget bounds
both); Redis also expires entries after ``ttl_s``. A cache never fails a request: a store that cannot be
reached is a miss (logged), and a damaged entry is dropped.
"""
from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

log = logging.getLogger("wmdeploy.serve")
_MAGIC = b"WMPC1"
_HEAD = struct.Struct("<5sI")  # magic, logits count; then float32 logits, then the snapshot


@dataclass
class CacheHit:
    tokens: int           # how many of the request's tokens the state holds
    snapshot: bytes
    logits: np.ndarray    # float32 [vocab]: the logits after the last of them


def entry_key(owner: str, tokens: Sequence[int]) -> str:
    ids = np.asarray(tokens, dtype="<i8").tobytes()
    return hashlib.sha256(owner.encode() + b"\0" + ids).hexdigest()[:40]


def _tenant(owner: str) -> str:
    return hashlib.sha256(owner.encode()).hexdigest()[:16]  # a file/key name for any tenant string


def pack(snapshot: bytes, logits: np.ndarray) -> bytes:
    row = np.ascontiguousarray(logits, dtype="<f4").reshape(-1)
    return _HEAD.pack(_MAGIC, row.size) + row.tobytes() + snapshot


def unpack(blob: bytes) -> tuple[bytes, np.ndarray]:
    if len(blob) < _HEAD.size:
        raise ValueError("prompt-cache entry: too short")
    magic, n = _HEAD.unpack_from(blob)
    if magic != _MAGIC or len(blob) < _HEAD.size + 4 * n:
        raise ValueError("prompt-cache entry: not an entry of this format")
    logits = np.frombuffer(blob, dtype="<f4", count=n, offset=_HEAD.size).astype(np.float32)
    return blob[_HEAD.size + 4 * n:], logits


class SharedTier(Protocol):
    """Where entries outlive this process and reach other replicas."""

    where: str

    def lengths(self, owner: str) -> set[int]: ...

    def get(self, owner: str, n: int, key: str) -> bytes | None: ...

    def put(self, owner: str, n: int, key: str, blob: bytes) -> None: ...

    def delete(self, owner: str, n: int, key: str) -> None: ...


class DirTier:
    """``--persist DIR``: one file per entry under ``DIR/prompt-cache/{model}/{tenant}/{n}-{hash}.bin`` (written to a
    temporary name and renamed, so a reader never sees half an entry)."""

    def __init__(self, root: Path, namespace: str = "") -> None:
        # one folder per model (name and file digest): a model file with other weights never reads these states
        self.root = Path(root) / "prompt-cache" / (_tenant(namespace) if namespace else "")
        self.where = f"--persist {root}"

    def _path(self, owner: str, n: int, key: str) -> Path:
        return self.root / _tenant(owner) / f"{n}-{key}.bin"

    def lengths(self, owner: str) -> set[int]:
        folder = self.root / _tenant(owner)
        if not folder.is_dir():
            return set()
        return {int(p.name.split("-", 1)[0]) for p in folder.glob("*.bin") if p.name.split("-", 1)[0].isdigit()}

    def get(self, owner: str, n: int, key: str) -> bytes | None:
        try:
            return self._path(owner, n, key).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, owner: str, n: int, key: str, blob: bytes) -> None:
        path = self._path(owner, n, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        tmp.write_bytes(blob)
        os.replace(tmp, path)

    def delete(self, owner: str, n: int, key: str) -> None:
        self._path(owner, n, key).unlink(missing_ok=True)


class RedisTier:
    """``--persist redis://...``: the replicas' shared entries (string keys with a TTL, a set of lengths)."""

    def __init__(self, url: str, namespace: str, ttl_s: float = 3600.0) -> None:
        import redis  # noqa: PLC0415  (the [redis] extra; the session store already needed it)

        self.client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.prefix, self.ttl_ms = f"wm:{namespace}:pc:", max(1, int(ttl_s * 1000))
        self.where = f"--persist {url}"

    def _key(self, owner: str, n: int, key: str) -> str:
        return f"{self.prefix}{_tenant(owner)}:{n}:{key}"

    def _lengths_key(self, owner: str) -> str:
        return f"{self.prefix}{_tenant(owner)}:lengths"

    def lengths(self, owner: str) -> set[int]:
        return {int(v) for v in self.client.smembers(self._lengths_key(owner))}

    def get(self, owner: str, n: int, key: str) -> bytes | None:
        return self.client.get(self._key(owner, n, key))

    def put(self, owner: str, n: int, key: str, blob: bytes) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self._key(owner, n, key), blob, px=self.ttl_ms)
        pipe.sadd(self._lengths_key(owner), n)  # a length whose entries all expired costs one empty GET later
        pipe.pexpire(self._lengths_key(owner), self.ttl_ms)
        pipe.execute()

    def delete(self, owner: str, n: int, key: str) -> None:
        self.client.delete(self._key(owner, n, key))


def open_tier(persist: str | Path | None, namespace: str, ttl_s: float | None) -> SharedTier | None:
    if persist is None:
        return None
    if str(persist).startswith(("redis://", "rediss://", "unix://")):
        return RedisTier(str(persist), namespace, ttl_s or 3600.0)
    return DirTier(Path(persist), namespace)


@dataclass
class _Entry:
    owner: str
    n: int
    blob: bytes


class PromptCache:
    """Entries in LRU order within ``budget_bytes``, plus the shared tier (see the module doc). Thread-safe:
    the generation workers look up and store concurrently."""

    def __init__(self, budget_bytes: int, tier: SharedTier | None = None, min_tokens: int = 1) -> None:
        self.budget, self.tier, self.min_tokens = int(budget_bytes), tier, min_tokens
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lengths: dict[str, Counter[int]] = {}
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, owner: str, tokens: Sequence[int], longest: int) -> CacheHit | None:
        """The stored state of the longest prefix of ``tokens`` of at most ``longest`` tokens, or None."""
        if not self.enabled or longest < self.min_tokens:
            return None
        with self._lock:
            candidates = set(self._lengths.get(owner, ()))
        if self.tier is not None:
            try:
                candidates |= self.tier.lengths(owner)
            except Exception as exc:  # noqa: BLE001  (a cache never fails a request)
                log.warning("prompt cache: shared tier unreachable", extra={"event": "prompt_cache_error",
                                                                           "error": str(exc)})
        for n in sorted((n for n in candidates if self.min_tokens <= n <= longest), reverse=True):
            key = entry_key(owner, tokens[:n])
            hit = self._read(owner, n, key)
            if hit is not None:
                return hit
        with self._lock:
            self.misses += 1
        return None

    def _read(self, owner: str, n: int, key: str) -> CacheHit | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        blob = entry.blob if entry is not None else None
        if blob is None and self.tier is not None:
            try:
                blob = self.tier.get(owner, n, key)
            except Exception:  # noqa: BLE001
                blob = None
            if blob is not None:
                self._remember(key, _Entry(owner, n, blob), write=False)
        if blob is None:
            return None
        try:
            snapshot, logits = unpack(blob)
        except ValueError:
            self._drop(owner, n, key)
            return None
        with self._lock:
            self.hits += 1
        return CacheHit(n, snapshot, logits)

    def store(self, owner: str, tokens: Sequence[int], snapshot: bytes, logits: np.ndarray) -> None:
        """Keep the state that holds exactly ``tokens`` (and the logits after the last one)."""
        n = len(tokens)
        if not self.enabled or n < self.min_tokens:
            return
        key = entry_key(owner, tokens)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
        blob = pack(snapshot, logits)
        if len(blob) > self.budget:
            return  # one conversation larger than the whole budget: nothing to gain
        self._remember(key, _Entry(owner, n, blob), write=True)

    def _remember(self, key: str, entry: _Entry, write: bool) -> None:
        gone: list[tuple[str, _Entry]] = []
        with self._lock:
            if key not in self._entries:
                self._entries[key] = entry
                self.bytes += len(entry.blob)
                self._lengths.setdefault(entry.owner, Counter())[entry.n] += 1
            while self.bytes > self.budget and len(self._entries) > 1:
                old_key, old = self._entries.popitem(last=False)
                self._drop_locked(old)
                gone.append((old_key, old))
                self.evictions += 1
        if self.tier is None:
            return
        try:
            if write:
                self.tier.put(entry.owner, entry.n, key, entry.blob)
            for old_key, old in gone:
                self.tier.delete(old.owner, old.n, old_key)
        except Exception as exc:  # noqa: BLE001
            log.warning("prompt cache: shared tier write failed", extra={"event": "prompt_cache_error",
                                                                        "error": str(exc)})

    def _drop_locked(self, entry: _Entry) -> None:
        self.bytes -= len(entry.blob)
        counts = self._lengths.get(entry.owner)
        if counts is not None:
            counts[entry.n] -= 1
            if counts[entry.n] <= 0:
                del counts[entry.n]

    def drop(self, owner: str, tokens: Sequence[int]) -> None:
        """Forget the entry of exactly ``tokens`` here and in the shared tier (a state the pool refused)."""
        self._drop(owner, len(tokens), entry_key(owner, tokens))

    def _drop(self, owner: str, n: int, key: str) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._drop_locked(entry)
        try:
            if self.tier is not None:
                self.tier.delete(owner, n, key)
        except Exception as exc:  # noqa: BLE001
            log.warning("prompt cache: shared tier delete failed", extra={"event": "prompt_cache_error",
                                                                         "error": str(exc)})

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.bytes, "budget_bytes": self.budget,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
