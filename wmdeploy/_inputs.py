"""Checking a step's inputs against the spec, before anything touches the engine or the state.

Policy: numpy arrays must already have the spec's dtype (no silent casts: float64 -> float32 loses
precision and int64 -> int32 can wrap, and a silent cast hides a caller's bug). Python lists, tuples and
scalars have no dtype of their own, so they are converted to the spec's dtype when that is lossless in
kind (ints into a float input are fine, floats into an int input are refused).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .contract import BATCH, StreamingSpec, TensorSpec, as_shape
from .errors import ContextLengthError, InputError

_KIND_OK = {"f": "biuf", "i": "biu", "u": "biu", "b": "b"}  # spec dtype kind -> list value kinds accepted


def _as_array(t: TensorSpec, value: Any, where: str) -> np.ndarray:
    want = t.np_dtype
    if isinstance(value, np.ndarray) or isinstance(value, np.generic):
        arr = np.asarray(value)
        if arr.dtype != want:
            raise InputError(f"{where}input '{t.name}': dtype {arr.dtype}, expected {t.dtype} "
                             f"(cast it explicitly, e.g. .astype(np.{t.dtype}); wmdeploy does not cast silently)")
        return arr
    if isinstance(value, (list, tuple, int, float, bool)):
        try:
            raw = np.asarray(value)
        except ValueError as exc:
            raise InputError(f"{where}input '{t.name}': cannot make an array of the given list ({exc})") from None
        if raw.dtype.kind not in _KIND_OK[want.kind]:
            raise InputError(f"{where}input '{t.name}': list of {raw.dtype} values, expected {t.dtype}")
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                arr = np.asarray(value, dtype=want)
        except (OverflowError, ValueError) as exc:
            raise InputError(f"{where}input '{t.name}': values do not fit {t.dtype} ({exc})") from None
        check_fits(t, raw, arr, where)
        return arr
    raise InputError(f"{where}input '{t.name}': got {type(value).__name__}, expected a numpy array of {t.dtype}")


def check_fits(t: TensorSpec, raw: np.ndarray, arr: np.ndarray, where: str) -> None:
    """Python ints out of range raise in numpy, but numpy ints inside a list (``[np.int64(-1)]``, a list of
    int64 arrays) wrap silently (-1 -> 255 in uint8), and a too-large float becomes inf: refuse both."""
    if not raw.size or raw.dtype.kind == "b":
        return
    bad = None
    if arr.dtype.kind in "iu":
        info = np.iinfo(arr.dtype)
        low, high = int(raw.min()), int(raw.max())
        bad = low if low < info.min else high if high > info.max else None
    elif arr.dtype.kind == "f":
        over = np.isinf(arr) & np.isfinite(raw)
        bad = raw[over].flat[0] if over.any() else None
    if bad is not None:
        raise InputError(f"{where}input '{t.name}': value {bad} does not fit {t.dtype}")


def check_inputs(spec: StreamingSpec, inputs: Mapping[str, Any], batch: int | None = None,
                 where: str = "") -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Validate ``inputs`` and return them as C-contiguous arrays plus the size of every named axis.

    ``batch`` is the batch size the caller must match (a stream's batch, 1 for a pool member); ``None``
    takes it from the inputs. ``where`` prefixes messages (``"stream 3: "``). Raises :class:`InputError`.
    """
    known = {t.name for t in spec.inputs}
    unknown = [n for n in inputs if n not in known]
    if unknown:
        hint = " (constants and states are fed by the runtime)" if any(
            n in {c.name for c in spec.constants} | {s.name for s in spec.states} for n in unknown) else ""
        raise InputError(f"{where}input '{unknown[0]}': unknown; expected {sorted(known)}{hint}")
    missing = [n for n in known if n not in inputs]
    if missing:
        raise InputError(f"{where}input '{missing[0]}': missing; expected {sorted(known)}")
    sizes: dict[str, int] = {} if batch is None else {BATCH: batch}
    out: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        arr = _as_array(t, inputs[t.name], where)
        if arr.ndim != len(t.shape):
            raise InputError(f"{where}input '{t.name}': rank {arr.ndim} (shape {list(arr.shape)}), "
                             f"expected rank {len(t.shape)} {as_shape(t.shape)}")
        for axis, (dim, size) in enumerate(zip(t.shape, arr.shape)):
            if isinstance(dim, int):
                if size != dim:
                    raise InputError(f"{where}input '{t.name}': axis {axis} has size {size}, expected {dim} "
                                     f"(shape {list(arr.shape)} vs {as_shape(t.shape)})")
                continue
            if size == 0:
                raise InputError(f"{where}input '{t.name}': axis {axis} ('{dim}') is empty, expected at least 1")
            seen = sizes.setdefault(dim, size)
            if seen != size:
                what = "the stream's batch" if dim == BATCH and batch is not None else f"'{dim}' of the other inputs"
                raise InputError(f"{where}input '{t.name}': axis {axis} ('{dim}') has size {size}, expected {seen} "
                                 f"({what})")
        out[t.name] = np.ascontiguousarray(arr)
    _check_max_batch(spec, sizes, where)
    _check_token_ids(spec, out, where)
    return out, sizes


def _bounds(spec: StreamingSpec) -> list[tuple[str, int, str]]:
    """(input, bound, what) for every integer input with a known range: a per-input ``index_bound`` (inferred
    from the embedding table by export/annotate) and a language model's ``meta.vocab_size``."""
    out = [(t.name, t.index_bound, "the rows of the table it indexes") for t in spec.inputs if t.index_bound]
    name, vocab = spec.meta.get("tokens_input"), spec.meta.get("vocab_size")
    if name and isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0:
        out.append((name, vocab, "the vocabulary"))
    return out


def _check_token_ids(spec: StreamingSpec, feeds: Mapping[str, np.ndarray], where: str) -> None:
    """Token ids (or any index input) must lie in ``[0, bound)``: ONNX's Gather wraps a negative id silently
    (-1 reads the last row: a wrong answer, no error), and a too-large one fails inside the engine, after
    other streams of a pool step may already have moved."""
    for name, bound, what in _bounds(spec):
        arr = feeds.get(name)
        if arr is None or arr.size == 0:
            continue
        if arr.size <= 64:  # a decode step's few tokens: plain Python beats two numpy reductions (~1 vs ~5 us)
            values = arr.ravel().tolist()
            low, high = min(values), max(values)
        else:
            low, high = int(arr.min()), int(arr.max())
        if low < 0 or high >= bound:
            bad = low if low < 0 else high
            raise InputError(f"{where}input '{name}': token id {bad} is outside {what} [0, {bound})")


def _check_max_batch(spec: StreamingSpec, sizes: Mapping[str, int], where: str) -> None:
    cap = spec.max_batch
    if cap is not None and sizes.get(BATCH, 1) > cap:
        raise InputError(f"{where}batch {sizes[BATCH]}: this model's graph fixes its batch at {cap} "
                         f"(meta.max_batch); step at most {cap} sequence(s) per call, or use a StreamPool")


#: words in an engine's error that put the fault on an input's values or shape (ONNX Runtime's
#: INVALID_ARGUMENT status; its Gather says "indices element out of data bounds", a shape check
#: "Got invalid dimensions for input: x")
_INPUT_FAULTS = ("INVALID_ARGUMENT", "out of data bounds", "out of bounds", "invalid dimensions")


def engine_blame(spec: StreamingSpec, exc: BaseException) -> str | None:
    """The data input(s) an engine failure points at (``"input 'tokens'"``), or None when its message does
    not say an input was at fault. For a server: such a failure is the client's (400), never a 500, even
    when it is the first engine call it ever made. An id past an embedding table that no ``index_bound``
    caught names the integer inputs, the only ones that can index."""
    text = str(exc)
    if not any(word in text for word in _INPUT_FAULTS):
        return None
    named = [t.name for t in spec.inputs if f"'{t.name}'" in text or f"input: {t.name} " in text]
    if not named and "bounds" in text:
        named = [t.name for t in spec.inputs if t.np_dtype.kind in "iu"]
    named = named or [t.name for t in spec.inputs]
    return ", ".join(f"input '{n}'" for n in named) or "its inputs"


def rows_of(arr: np.ndarray, axis: int, n: int) -> list[np.ndarray]:
    """Split ``arr`` into ``n`` views of size 1 along ``axis`` (no copies)."""
    if axis == 0:
        return [arr[i:i + 1] for i in range(n)]
    lead = (slice(None),) * axis
    return [arr[lead + (slice(i, i + 1),)] for i in range(n)]


def as_count(value: Any) -> Any:
    """A numpy integer as a plain int (``np.int64(4)`` is a fine pool size); anything else unchanged."""
    return int(value) if isinstance(value, np.integer) else value


class ContextBound:
    """The positions of a language model's streams (``meta.position_state``, written by ``export hf:``) and its
    context capacity (``meta.max_context``; absent for a constant-size memory): a step of ``t`` tokens at
    position ``p`` is refused, before anything runs, when ``p + t`` would pass the capacity."""

    def __init__(self, spec: StreamingSpec) -> None:
        # None: the memory is constant-size (sliding-window rings, SSM states): positions, no bound
        self.capacity = int(spec.meta["max_context"]) if spec.meta.get("max_context") is not None else None
        self.state = str(spec.meta["position_state"])
        self.tokens = spec.input(str(spec.meta.get("tokens_input", spec.inputs[0].name)))
        self.time_axis = self.tokens.shape.index("time") if "time" in self.tokens.shape else None
        # ONNX Runtime's GroupQueryAttention takes several rows of more than one token each only when no row
        # has a past ("batch_size must be 1 when sequence_length > 1 and past context is given")
        self.fresh_rows_only = spec.meta.get("prefill_batch") == "fresh"

    @staticmethod
    def of(spec: StreamingSpec) -> "ContextBound | None":
        meta = spec.meta
        if "position_state" not in meta:
            return None
        return ContextBound(spec)

    def check(self, position: np.ndarray | int, feeds: Mapping[str, np.ndarray], where: str = "") -> int:
        """The step's token count; ``ContextLengthError`` when a row would pass the capacity."""
        t = int(feeds[self.tokens.name].shape[self.time_axis]) if self.time_axis is not None else 1
        held = int(np.max(position)) if np.size(position) else 0
        if self.capacity is not None and held + t > self.capacity:
            raise ContextLengthError(
                f"{where}{held} tokens held + {t} new would pass the context capacity of {self.capacity} tokens "
                f"(the file's --max-context); nothing ran, the stream is unchanged")
        return t

    def positions(self, states: Mapping[str, np.ndarray]) -> np.ndarray:
        """Per-row positions from restored states (a snapshot), checked against the capacity."""
        pos = np.asarray(states[self.state], dtype=np.int64).reshape(-1).copy()
        if pos.size and (pos.min() < 0 or (self.capacity is not None and pos.max() > self.capacity)):
            raise InputError(f"snapshot: state '{self.state}' holds position {int(pos.min() if pos.min() < 0 else pos.max())}, "
                             f"outside 0..{self.capacity if self.capacity is not None else 'any'}")
        return pos

    def one_row_per_chunk(self, positions: np.ndarray) -> bool:
        """Whether a multi-token step of these rows must go one row per engine call."""
        return self.fresh_rows_only and bool(np.any(positions > 0))

    def split(self, groups: dict[Any, list[Any]], positions: Mapping[int, int]) -> dict[Any, list[Any]]:
        """Pool groups (key -> [(slot, sid, feeds)]) with multi-token members that have a past one per call;
        members at position 0 stay batched."""
        if not self.fresh_rows_only:
            return groups
        out: dict[Any, list[Any]] = {}
        for key, members in groups.items():
            if self.time_axis is None or members[0][2][self.tokens.name].shape[self.time_axis] <= 1:
                out[key] = members
                continue
            fresh = [m for m in members if positions[m[1]] == 0]
            if fresh:
                out[(key, "fresh")] = fresh
            out.update({(key, m[1]): [m] for m in members if positions[m[1]] != 0})
        return out

    def run_rows(self, backend: Any, arena: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A lock-step batch's multi-token step, one row per engine call, all-or-nothing (the arena's undo)."""
        n = next(iter(feeds.values())).shape[self.tokens.batch_axis]
        token = arena.checkpoint(range(0, n))
        outs = []
        try:
            for i in range(n):
                outs.append(backend.run(arena, range(i, i + 1), {k: np.take(v, [i], axis=self.tokens.batch_axis)
                                                                for k, v in feeds.items()}))
        except BaseException:
            arena.rollback(token)
            raise
        arena.commit(token)
        return {k: np.concatenate([o[k] for o in outs], axis=0) for k in outs[0]}
