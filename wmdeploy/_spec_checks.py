"""The vocabulary of a spec's tensors: the dtypes it may name (with their numpy and ONNX equivalents), and
the checks of a shape, a batch axis and an initial value that every spec type shares.

Split from ``contract`` (which re-exports ``BATCH`` and the tables: import them from there); numpy only.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from .errors import SpecError

BATCH = "batch"

#: The dtypes a spec may name, with their numpy equivalents and ONNX TensorProto codes.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "float64": np.dtype(np.float64),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}
ONNX_TYPE_CODES: dict[str, int] = {
    "float32": 1, "uint8": 2, "int8": 3, "int32": 6, "int64": 7, "bool": 9, "float16": 10, "float64": 11,
}
ONNX_CODE_TO_DTYPE = {code: name for name, code in ONNX_TYPE_CODES.items()}

Dim = int | str


def _check_dtype(owner: str, dtype: str) -> None:
    if dtype not in DTYPES:
        raise SpecError(f"{owner}: unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")


def _normalise_shape(owner: str, shape: Iterable[Dim]) -> tuple[Dim, ...]:
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Iterable):
        raise SpecError(f"{owner}: shape must be a list of ints and axis names, got {shape!r}")
    dims: list[Dim] = []
    for axis, dim in enumerate(shape):
        if isinstance(dim, bool) or not isinstance(dim, (int, str)):
            raise SpecError(f"{owner}: axis {axis} is {dim!r}; expected a positive int or an axis name")
        if isinstance(dim, int) and dim <= 0:
            raise SpecError(f"{owner}: axis {axis} is {dim}; fixed sizes must be positive")
        if isinstance(dim, str) and not dim:
            raise SpecError(f"{owner}: axis {axis} has an empty name")
        dims.append(dim)
    return tuple(dims)


def _batch_axis(owner: str, shape: tuple[Dim, ...]) -> int:
    hits = [i for i, d in enumerate(shape) if d == BATCH]
    if len(hits) != 1:
        what = "no" if not hits else f"{len(hits)}"
        raise SpecError(f"{owner}: shape {list(shape)} has {what} '{BATCH}' axis; expected exactly one")
    return hits[0]


def _check_init(owner: str, dtype: str, init: Any) -> None:
    kind = DTYPES[dtype].kind
    if isinstance(init, bool):
        ok = kind == "b"
    elif isinstance(init, (int, np.integer)):
        ok = kind in "iuf"
    elif isinstance(init, (float, np.floating)):
        ok = kind == "f"
    else:
        ok = False
    if not ok:
        raise SpecError(
            f"{owner}: initial value {init!r} ({type(init).__name__}) does not fit dtype {dtype}; "
            f"expected a {'bool' if kind == 'b' else 'int' if kind in 'iu' else 'number'}"
        )
    # The range itself, not np.can_cast(..., "same_kind"), which allows any narrowing within a kind
    # (300 into int8): the value then failed as a bare OverflowError when the memory was allocated.
    if kind in "iu" and not np.iinfo(DTYPES[dtype]).min <= int(init) <= np.iinfo(DTYPES[dtype]).max:
        raise SpecError(f"{owner}: initial value {init!r} is out of range for {dtype}")
