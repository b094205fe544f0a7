"""Snapshots: one stream's working memory as self-checking bytes.

Format (version 1), all integers little-endian::

    offset  size  field
    0       8     magic  b"WMSNAP\\r\\n"   (\\r\\n catches text-mode mangling, as in PNG)
    8       2     format version, uint16 (1)
    10      2     flags, uint16 (0; reserved)
    12      4     header length H, uint32
    16      H     header, UTF-8 JSON:
                    {"layout": spec.layout_hash(),
                     "states": [{"name", "dtype" (numpy str, e.g. "<f4"), "shape" (batch = b, the same b for all),
                                 "offset" (from the start of the tensor block), "nbytes",
                                 "axis"?, "extent"? (a KV cache stored up to the stream's position on
                                 that axis; zero-padded back to extent on load)}, ...],
                     "meta": {...}}          # free-form, e.g. {"steps": 12}
    16+H    N     tensor block: each state's raw bytes, C order, little-endian, in header order
    end-32  32    SHA-256 of every byte before it

Loading checks, in order, before any state is touched: length and magic, the checksum (so truncation and
corruption are refused whole, never half-loaded), the version, the header, then the layout hash against
the receiving model's spec and every tensor's dtype/shape/extent. The layout hash covers state names,
output names, dtypes and shapes (see ``StreamingSpec.layout_hash``), so a snapshot only ever resumes on
a model with the same working memory, whatever its weights.
"""
from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Mapping

import numpy as np

from .contract import StreamingSpec, as_shape
from .errors import SnapshotError

MAGIC = b"WMSNAP\r\n"
VERSION = 1
_PREFIX = struct.Struct("<8sHHI")
_DIGEST = 32


def context_axes(spec: StreamingSpec, inplace_only: bool = False) -> dict[str, int]:
    """States whose ``axis`` holds one row per context position, masked past the stream's position
    (``meta.context_axes``, written by ``export hf:``): a snapshot may keep only the rows a stream holds, and
    the rest is restored as zeros. Snapshots are written trimmed for in-place states only (the portable form's
    snapshots stay whole, as other runtimes read them) and read trimmed into either form."""
    axes = spec.meta.get("context_axes") or {}
    return {s.name: int(axes[s.name]) for s in spec.states
            if isinstance(axes.get(s.name), int) and (s.inplace or not inplace_only)}


def dumps(spec: StreamingSpec, states: Mapping[str, np.ndarray], meta: dict[str, Any] | None = None,
          live: int | None = None) -> bytes:
    """Serialise one stream's states (each at the same batch ``b``, usually 1, as the spec shapes them).

    ``live``: the positions the stream holds; a KV cache written in place (:func:`context_axes`) is stored up
    to there only, so a snapshot's size follows the context, not the capacity (entry fields ``axis`` and
    ``extent``: the full length it is padded back to on load)."""
    entries, chunks, offset = [], [], 0
    batch = np.shape(states[spec.states[0].name])[spec.states[0].batch_axis] if spec.states else 1
    trim = context_axes(spec, inplace_only=True) if live is not None else {}
    axes = context_axes(spec)
    for s in spec.states:
        arr = np.ascontiguousarray(states[s.name], dtype=s.np_dtype.newbyteorder("<"))
        full, axis = s.shape_for(batch), axes.get(s.name, -1)
        # a capacity tier's buffer (wmdeploy.pooling) is shorter on its context axis: written as the file's
        short = axis >= 0 and arr.ndim == len(full) and arr.shape[axis] < full[axis] and \
            arr.shape[:axis] + arr.shape[axis + 1:] == full[:axis] + full[axis + 1:]
        if arr.shape != full and not short:
            raise SnapshotError(f"state '{s.name}': shape {list(arr.shape)}, expected {list(full)}")
        extra: dict[str, int] = {}
        if s.name in trim and live is not None and 0 <= live < full[axis] and live <= arr.shape[axis]:
            extra = {"axis": axis, "extent": full[axis]}
            arr = np.ascontiguousarray(arr[(slice(None),) * axis + (slice(0, live),)])
        elif short:  # stored whole (the portable form's snapshots): the rows past the tier are masked, as zeros
            padded = np.zeros(full, arr.dtype)
            padded[(slice(None),) * axis + (slice(0, arr.shape[axis]),)] = arr
            arr = padded
        raw = arr.tobytes()
        entries.append({"name": s.name, "dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset,
                        "nbytes": len(raw), **extra})
        chunks.append(raw)
        offset += len(raw)
    header = json.dumps({"layout": spec.layout_hash(), "states": entries, "meta": meta or {}},
                        separators=(",", ":")).encode()
    body = b"".join([_PREFIX.pack(MAGIC, VERSION, 0, len(header)), header, *chunks])
    return body + hashlib.sha256(body).digest()


def read_header(blob: bytes | bytearray | memoryview) -> tuple[dict[str, Any], memoryview]:
    """Verify framing and checksum; return the header and the tensor block. Raises :class:`SnapshotError`."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise SnapshotError(f"snapshot: got {type(blob).__name__}, expected bytes")
    view = memoryview(blob).cast("B")
    if len(view) < _PREFIX.size + _DIGEST:
        raise SnapshotError(f"snapshot: {len(view)} bytes is too short to be a snapshot (truncated?)")
    magic, version, _flags, hlen = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise SnapshotError(f"snapshot: bad magic {bytes(magic)!r}, expected {MAGIC!r} (not a wmdeploy snapshot)")
    if hashlib.sha256(view[:-_DIGEST]).digest() != bytes(view[-_DIGEST:]):
        raise SnapshotError(f"snapshot: checksum mismatch over {len(view)} bytes (truncated or corrupted)")
    if version != VERSION:
        raise SnapshotError(f"snapshot: format version {version}, this wmdeploy reads version {VERSION}")
    end = _PREFIX.size + hlen
    if end > len(view) - _DIGEST:
        raise SnapshotError(f"snapshot: header length {hlen} runs past the end")
    try:
        header = json.loads(bytes(view[_PREFIX.size:end]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"snapshot: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("states"), list):
        raise SnapshotError("snapshot: header lacks a 'states' list")
    return header, view[end:-_DIGEST]


def loads(spec: StreamingSpec, blob: bytes | bytearray | memoryview) -> dict[str, np.ndarray]:
    """The states in ``blob`` (batch ``b`` each), after every check against ``spec``; nothing is half-loaded."""
    header, block = read_header(blob)
    batch = None
    if header.get("layout") != spec.layout_hash():
        have = [e.get("name") for e in header["states"] if isinstance(e, dict)]
        raise SnapshotError(f"snapshot: state layout hash {str(header.get('layout'))[:12]}... (states {have}) "
                            f"does not match this model's {spec.layout_hash()[:12]}... "
                            f"(states {[s.name for s in spec.states]})")
    entries = {e.get("name"): e for e in header["states"] if isinstance(e, dict)}
    if len(entries) != len(header["states"]):  # a state listed twice: readers would disagree on which one counts
        raise SnapshotError("snapshot: its header lists a state twice (or an entry that is not an object)")
    out: dict[str, np.ndarray] = {}
    for s in spec.states:
        e = entries.get(s.name)
        if e is None:
            raise SnapshotError(f"snapshot: state '{s.name}' is missing")
        try:
            dtype = np.dtype(e["dtype"])
            shape, offset, nbytes = tuple(int(d) for d in e["shape"]), int(e["offset"]), int(e["nbytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"snapshot: state '{s.name}' has a malformed entry ({exc})") from None
        if batch is None and len(shape) == len(s.shape):
            batch = shape[s.batch_axis]
        want = s.shape_for(batch) if batch is not None else None
        axis = e.get("axis")
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise SnapshotError(f"snapshot: state '{s.name}' has a malformed entry (axis {str(axis)[:20]!r})")
        if axis is not None and want is not None:  # a KV cache stored up to the stream's position
            if context_axes(spec).get(s.name) != axis or e.get("extent") != want[axis] or len(shape) != len(want) \
                    or not 0 <= shape[axis] <= want[axis]:
                raise SnapshotError(f"snapshot: state '{s.name}' is stored trimmed on axis {axis} to "
                                    f"{list(shape)}; this model's state is {as_shape(s.shape)} and not trimmable there")
            want = want[:axis] + (shape[axis],) + want[axis + 1:]
        if dtype.newbyteorder("=") != s.np_dtype or batch is None or batch < 1 or shape != want:
            raise SnapshotError(f"snapshot: state '{s.name}' is {dtype} {list(shape)}, "
                                f"expected {s.dtype} {as_shape(s.shape)}")
        if nbytes != int(np.prod(shape)) * dtype.itemsize or offset < 0 or offset + nbytes > len(block):
            raise SnapshotError(f"snapshot: state '{s.name}' spans bytes {offset}..{offset + nbytes} "
                                f"of a {len(block)}-byte tensor block")
        arr = np.frombuffer(block, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
        if axis is not None:  # the rows past the position are masked: zeros restore them exactly enough
            full = np.zeros(s.shape_for(batch), dtype=s.np_dtype)
            full[(slice(None),) * axis + (slice(0, shape[axis]),)] = arr
            out[s.name] = full
        else:
            out[s.name] = arr.astype(s.np_dtype, copy=True)  # native byte order, owned, writeable
    return out


def meta(blob: bytes) -> dict[str, Any]:
    """The free-form ``meta`` of a (checksum-verified) snapshot, e.g. ``{"steps": 12}``."""
    return dict(read_header(blob)[0].get("meta") or {})


def steps_of(blob: bytes) -> int:
    """The step count in a (checksum-verified) snapshot's meta, checked before anything is allocated: a
    re-checksummed snapshot can carry any JSON there, and failing after a pool slot was taken leaked it."""
    try:
        steps = meta(blob).get("steps", 0)
    except (TypeError, ValueError, AttributeError):
        raise SnapshotError("snapshot: its header's 'meta' is not an object") from None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise SnapshotError(f"snapshot: meta.steps {str(steps)[:20]!r}, expected a step count >= 0")
    return steps
