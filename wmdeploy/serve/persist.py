"""Crash-safe session state: an append-only log of snapshots with group commit.

Why a log of *snapshots* and not one file per session, and not a log of *inputs*:

* One file per session (temp file + ``os.replace`` + fsync of file and directory) costs two fsyncs per
  session per step; a batch of 32 sessions would pay 64 fsyncs before it can answer. The log appends the
  snapshots of every session stepped in one batch with **one write and one fsync** (group commit), so the
  cost per batch is one fsync whatever the batch size.
* A write-ahead log of *inputs* would have to be replayed through the engine on restart, and a replay in
  other batch compositions is not bit-identical (batched matmuls round differently). Snapshots restore the
  exact bits that the engine produced, and need no engine at restore time.

Record framing (little-endian)::

    magic b"WMLT" | key length u32 | data length u64 | written at f64 (Unix seconds) | key (UTF-8) | data
    | crc32 of everything before it

(``b"WMLR"`` records, written before the time field existed, have no time and are still read: they count
as written when the log was opened.) ``data`` is a snapshot (itself SHA-256-checked, see
:mod:`wmdeploy.snapshot`); an empty ``data`` is a tombstone (the session was deleted, its sequence ended,
or it expired). The latest record of a key wins. A torn tail (a crash in the middle of an append) fails
its crc and is cut off on open: it was never fsynced, so it was never acknowledged.

Bounded: the live bytes are a running sum and the keys are kept in the order of their last write, so an
append costs O(records) bookkeeping whatever the log holds; :meth:`expire` deletes the keys not written
since a cutoff (``--persist-ttl``) from the front of that order. When the file grows past a few times
its live bytes it is rewritten with only the latest records, streamed one record at a time (memory
bounded by the largest snapshot, not by the log), into a temp file that replaces the log atomically
(fsync, ``os.replace``, fsync of the directory). A compaction that fails (a full disk) leaves the log as
it was and is retried only after the log has grown again; appends go on.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock (one server per directory is then on you)
    fcntl = None  # type: ignore[assignment]

from ..errors import WmdeployError

_HEAD = struct.Struct("<4sIQd")  # magic, key length, data length, written at
_HEAD_V1 = struct.Struct("<4sIQ")  # the first format: no time
_MAGIC, _MAGIC_V1 = b"WMLT", b"WMLR"
_CRC = 4
_COPY_BUFFER = 1 << 20  # compaction writes in pieces of about this size
_EXPIRE_MAX = 10_000  # tombstones written by one expiry pass (bounds the engine thread's pause)
LOG_NAME = "sessions.wal"
log = logging.getLogger("wmdeploy.serve")


class PersistError(WmdeployError):
    """The state log cannot be read or written (disk full, permissions)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse(buf: bytes, at: int = 0) -> tuple[int, int, int, float | None] | None:
    """(header size, key length, data length, written at) of the record header at ``buf[at:]``, or None."""
    magic = buf[at:at + 4]
    if magic == _MAGIC and len(buf) - at >= _HEAD.size:
        _, klen, dlen, when = _HEAD.unpack_from(buf, at)
        return _HEAD.size, klen, dlen, when
    if magic == _MAGIC_V1 and len(buf) - at >= _HEAD_V1.size:
        _, klen, dlen = _HEAD_V1.unpack_from(buf, at)
        return _HEAD_V1.size, klen, dlen, None
    return None


def _lock(fd: int, path: Path) -> None:
    """Hold an exclusive lock on the log file as long as ``fd`` is open: a second process on the same
    directory would append at its own idea of the end of the file, over acknowledged records."""
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise PersistError(f"--persist {path}: the state log is in use by another server (one process per "
                           "directory; replicas share sessions through --persist redis://...)") from None


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(f"short write at byte {offset}")
        view, offset = view[n:], offset + n


class StateLog:
    """Latest snapshot per session key, durable once :meth:`append` returns. One writer thread at a time."""

    def __init__(self, directory: str | Path, compact_min_bytes: int = 1 << 20) -> None:
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PersistError(f"--persist {self.dir}: cannot create the directory ({exc})") from None
        self.path = self.dir / LOG_NAME
        self.compact_min_bytes = compact_min_bytes
        self._lock = threading.Lock()  # reads (snapshot downloads) may come from another thread
        self.index: dict[str, tuple[int, int]] = {}  # key -> (offset of data, length)
        self._when: OrderedDict[str, float] = OrderedDict()  # key -> last write (Unix s), oldest first
        self._live = 0  # sum of the index's lengths, kept as records come and go
        self._dirty = False  # a failed append could not cut its partial write: cut it before the next
        self._compact_at = 0  # do not try to compact again before the file reaches this size
        self.fsyncs = 0
        self._open()

    # ---- open / replay --------------------------------------------------------------------------------
    def _open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise PersistError(f"--persist {self.path}: cannot open the state log ({exc})") from None
        _lock(self._fd, self.path)
        size = os.fstat(self._fd).st_size
        good = self._replay(size)
        if good < size and self._valid_record_after(good, size):
            # Not a torn tail (a crash tears only the last write): a damaged record with acknowledged
            # records behind it. Truncating would silently drop those sessions; refuse instead.
            os.close(self._fd)
            raise PersistError(f"--persist {self.path}: damaged record at byte {good} of {size} with valid records "
                               "after it; refusing to drop acknowledged sessions: move the file aside to start empty")
        if good < size:  # a torn, never-acknowledged tail: cut it so the next append starts clean
            os.ftruncate(self._fd, good)
            os.fsync(self._fd)
        self._end = good

    def _valid_record_after(self, start: int, size: int) -> bool:
        """Whether a whole, checksummed record begins anywhere in ``(start, size)``."""
        rest = os.pread(self._fd, size - start, start)
        for magic in (_MAGIC, _MAGIC_V1):
            at = rest.find(magic, 1)
            while at != -1:
                head = _parse(rest, at)
                if head is not None:
                    end = at + head[0] + head[1] + head[2] + _CRC
                    if end <= len(rest):
                        body = rest[at:end]
                        if zlib.crc32(body[:-_CRC]) == struct.unpack("<I", body[-_CRC:])[0]:
                            return True
                at = rest.find(magic, at + 1)
        return False

    def _replay(self, size: int) -> int:
        """Index every whole record (one record in memory at a time); returns where the good part ends."""
        self.index.clear()
        self._when.clear()
        self._live, pos, opened = 0, 0, time.time()
        while pos + _HEAD_V1.size + _CRC <= size:
            head = _parse(os.pread(self._fd, _HEAD.size, pos))
            if head is None:
                break
            hsize, klen, dlen, when = head
            end = pos + hsize + klen + dlen + _CRC
            if end > size:
                break
            body = os.pread(self._fd, end - pos, pos)
            if zlib.crc32(body[:-_CRC]) != struct.unpack("<I", body[-_CRC:])[0]:
                break
            key = body[hsize:hsize + klen].decode("utf-8", "replace")
            self._place(key, (pos + hsize + klen, dlen) if dlen else None, opened if when is None else when)
            pos = end
        return pos

    def _place(self, key: str, where: tuple[int, int] | None, when: float) -> None:
        """The index after one record (O(1)): the latest record of a key wins."""
        old = self.index.pop(key, None)
        if old is not None:
            self._live -= old[1]
        self._when.pop(key, None)
        if where is not None:
            self.index[key] = where
            self._live += where[1]
            self._when[key] = when

    # ---- reads --------------------------------------------------------------------------------------
    def __contains__(self, key: object) -> bool:
        return key in self.index

    def keys(self) -> list[str]:
        return list(self.index)

    def read(self, key: str) -> bytes | None:
        with self._lock:
            where = self.index.get(key)
            return None if where is None else os.pread(self._fd, where[1], where[0])

    @property
    def live_bytes(self) -> int:
        return self._live

    def written_at(self, key: str) -> float | None:
        """When ``key``'s latest record was written (Unix seconds), or None if the log does not hold it."""
        return self._when.get(key)

    # ---- writes -------------------------------------------------------------------------------------
    @staticmethod
    def _record(key: str, data: bytes, when: float | None = None) -> bytes:
        k = key.encode()
        body = _HEAD.pack(_MAGIC, len(k), len(data), time.time() if when is None else when) + k + data
        return body + struct.pack("<I", zlib.crc32(body))

    def append(self, records: list[tuple[str, bytes | None]]) -> None:
        """Write every (key, snapshot or None = delete) with one write and one fsync; durable on return."""
        if not records:
            return
        now = time.time()
        parts, placed, pos = [], [], self._end
        for key, data in records:
            rec = self._record(key, data or b"", now)
            klen = len(key.encode())
            placed.append((key, (pos + _HEAD.size + klen, len(data)) if data else None))
            parts.append(rec)
            pos += len(rec)
        blob = b"".join(parts)
        with self._lock:
            try:
                if self._dirty:  # the bytes of an earlier failed append are still past the end: cut them first
                    os.ftruncate(self._fd, self._end)
                    self._dirty = False
                _write_all(self._fd, blob, self._end)
                os.fsync(self._fd)
            except OSError as exc:
                try:
                    os.ftruncate(self._fd, self._end)  # never leave a half record that a later append follows
                except OSError:
                    self._dirty = True  # a later append cuts it (or fails, and says so) before writing
                raise PersistError(f"--persist {self.path}: cannot write the state log ({exc})") from None
            self.fsyncs += 1
            self._end = pos
            for key, where in placed:
                self._place(key, where, now)
        if self._end > max(self.compact_min_bytes, 4 * self._live, self._compact_at):
            self._try_compact()

    def expire(self, cutoff: float) -> list[str]:
        """Delete (tombstone) the keys whose latest record was written before ``cutoff`` (Unix seconds);
        returns them. Raises :class:`PersistError` when the tombstones cannot be written (nothing changes)."""
        old = []
        for key, when in self._when.items():  # oldest first: stop at the first younger one
            if when >= cutoff or len(old) >= _EXPIRE_MAX:
                break
            old.append(key)
        if old:
            self.append([(key, None) for key in old])
        return old

    def _try_compact(self) -> None:
        try:
            self.compact()
        except (OSError, PersistError) as exc:  # a full disk: keep appending to the log as it is
            self._compact_at = self._end + max(self.compact_min_bytes, self._live)
            log.warning("state log compaction failed; retried once the log has grown",
                        extra={"event": "compact_error", "error": str(exc), "bytes": self._end})

    def compact(self) -> None:
        """Rewrite the log with only the latest record of each live key, one record at a time (atomic: temp
        file + fsync + replace). On failure the log is unchanged and the temp file removed."""
        with self._lock:
            tmp = self.path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                if fcntl is not None:  # locked before it becomes the log (the old file's lock goes with it)
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                index, pos, buf = {}, 0, bytearray()
                for key, when in self._when.items():  # oldest first, so a replay rebuilds the same order
                    off, n = self.index[key]
                    rec = self._record(key, os.pread(self._fd, n, off), when)
                    index[key] = (pos + len(buf) + _HEAD.size + len(key.encode()), n)
                    buf += rec
                    if len(buf) >= _COPY_BUFFER:
                        _write_all(fd, buf, pos)
                        pos, buf = pos + len(buf), bytearray()
                _write_all(fd, buf, pos)
                pos += len(buf)
                os.fsync(fd)
                os.replace(tmp, self.path)  # fd now is the log: no re-open that could fail after this
            except BaseException:
                os.close(fd)
                try:
                    tmp.unlink()
                except OSError:
                    pass
                raise
            old, self._fd = self._fd, fd
            os.close(old)
            self.index, self._end, self._dirty, self._compact_at = index, pos, False, 0
            try:
                _fsync_dir(self.dir)
            except OSError as exc:  # the rename is done; only its durability across a power cut is in doubt
                log.warning("fsync of the --persist directory failed", extra={"event": "fsync_dir", "error": str(exc)})

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)
