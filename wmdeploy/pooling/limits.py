"""A pool's limits, checked the same way for every kind of pool: a stream count, reserved slots, the shrink
delay, and a byte budget (``max_bytes``; ``wmdeploy serve --max-memory 2GB``)."""
from __future__ import annotations

import re
from typing import Any

from .._inputs import as_count
from ..errors import CapacityError, InputError

_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def pool_args(capacity: Any, reserve: Any, shrink_after_s: float) -> tuple[int | None, int]:
    """``(capacity, reserve)`` as ints (numpy integers are counts too), or ``CapacityError``/``InputError``."""
    capacity, reserve = as_count(capacity), as_count(reserve)
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
        raise CapacityError(f"pool capacity {capacity!r}: expected at least 1, or None for no limit")
    if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0 or (capacity and reserve > capacity):
        raise CapacityError(f"pool reserve {reserve!r}: expected 0..{capacity if capacity else 'any'} slots")
    if not shrink_after_s >= 0:  # NaN too
        raise InputError(f"pool shrink_after_s {shrink_after_s!r}: expected seconds >= 0")
    return capacity, reserve


def parse_size(text: str | int, flag: str = "--max-memory") -> int:
    """``"2GB"``, ``"512MB"``, ``"1.5GiB"``, ``"300000000"`` -> bytes (decimal units: GB = 10^9; GiB = 2^30)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B?|B)?\s*", str(text), re.IGNORECASE)
        unit = (m.group(2) or "").upper() if m else ""
        unit = unit if unit.endswith("B") or not unit else unit + "B"
        if m is None or unit not in _UNITS:
            raise InputError(f"{flag} {text!r}: expected a size such as 2GB, 512MB or 1.5GiB")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value < 1:
        raise InputError(f"{flag} {text!r}: expected at least 1 byte")
    return value
