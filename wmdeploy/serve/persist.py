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

    magic b"WMLR" | key length u32 | data length u64 | key (UTF-8) | data | crc32 of everything before it

``data`` is a snapshot (itself SHA-256-checked, see :mod:`wmdeploy.snapshot`); an empty ``data`` is a
tombstone (the session was deleted or its sequence ended). The latest record of a key wins. A torn tail
(a crash in the middle of an append) fails its crc and is cut off on open: it was never fsynced, so it
was never acknowledged. When the file grows past a few times its live bytes it is rewritten with only the
latest records (temp file, fsync, ``os.replace``, fsync of the directory), so it stays bounded.
"""
from __future__ import annotations

import os
import struct
import threading
import zlib
from pathlib import Path

from ..errors import WmdeployError

_HEAD = struct.Struct("<4sIQ")
_MAGIC = b"WMLR"
_CRC = 4
LOG_NAME = "sessions.wal"


class PersistError(WmdeployError):
    """The state log cannot be read or written (disk full, permissions)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        self.fsyncs = 0
        self._open()

    # ---- open / replay --------------------------------------------------------------------------------
    def _open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise PersistError(f"--persist {self.path}: cannot open the state log ({exc})") from None
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
        at = rest.find(_MAGIC, 1)
        while at != -1:
            if at + _HEAD.size + _CRC <= len(rest):
                _, klen, dlen = _HEAD.unpack(rest[at:at + _HEAD.size])
                end = at + _HEAD.size + klen + dlen + _CRC
                if end <= len(rest):
                    body = rest[at:end]
                    if zlib.crc32(body[:-_CRC]) == struct.unpack("<I", body[-_CRC:])[0]:
                        return True
            at = rest.find(_MAGIC, at + 1)
        return False

    def _replay(self, size: int) -> int:
        self.index.clear()
        pos = 0
        while pos + _HEAD.size + _CRC <= size:
            head = os.pread(self._fd, _HEAD.size, pos)
            magic, klen, dlen = _HEAD.unpack(head)
            end = pos + _HEAD.size + klen + dlen + _CRC
            if magic != _MAGIC or end > size:
                break
            body = os.pread(self._fd, end - pos, pos)
            if zlib.crc32(body[:-_CRC]) != struct.unpack("<I", body[-_CRC:])[0]:
                break
            key = body[_HEAD.size:_HEAD.size + klen].decode("utf-8", "replace")
            if dlen:
                self.index[key] = (pos + _HEAD.size + klen, dlen)
            else:
                self.index.pop(key, None)
            pos = end
        return pos

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
        return sum(n for _, n in self.index.values())

    # ---- writes -------------------------------------------------------------------------------------
    @staticmethod
    def _record(key: str, data: bytes) -> bytes:
        k = key.encode()
        body = _HEAD.pack(_MAGIC, len(k), len(data)) + k + data
        return body + struct.pack("<I", zlib.crc32(body))

    def append(self, records: list[tuple[str, bytes | None]]) -> None:
        """Write every (key, snapshot or None = delete) with one write and one fsync; durable on return."""
        if not records:
            return
        parts, placed, pos = [], [], self._end
        for key, data in records:
            rec = self._record(key, data or b"")
            klen = len(key.encode())
            placed.append((key, (pos + _HEAD.size + klen, len(data)) if data else None))
            parts.append(rec)
            pos += len(rec)
        blob = b"".join(parts)
        with self._lock:
            try:
                written = os.pwrite(self._fd, blob, self._end)
                if written != len(blob):
                    raise OSError(f"short write ({written} of {len(blob)} bytes)")
                os.fsync(self._fd)
            except OSError as exc:
                os.ftruncate(self._fd, self._end)  # never leave a half record that a later append follows
                raise PersistError(f"--persist {self.path}: cannot write the state log ({exc})") from None
            self.fsyncs += 1
            self._end = pos
            for key, where in placed:
                if where is None:
                    self.index.pop(key, None)
                else:
                    self.index[key] = where
        if self._end > max(self.compact_min_bytes, 4 * self.live_bytes):
            self.compact()

    def compact(self) -> None:
        """Rewrite the log with only the latest record of each live key (atomic: temp + fsync + replace)."""
        with self._lock:
            tmp = self.path.with_suffix(".tmp")
            records = [(k, os.pread(self._fd, n, off)) for k, (off, n) in self.index.items()]
            with open(tmp, "wb") as f:
                f.write(b"".join(self._record(k, d) for k, d in records))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(self.dir)
            os.close(self._fd)
            self._open()

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)
