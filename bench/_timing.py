"""The timing loop the bench scripts share (``from _timing import interleaved``; the scripts run as
``python bench/x.py`` and put their own folder on ``sys.path``)."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np


def interleaved(methods: dict[str, Callable[[], Any]], rounds: int, per_round: int, warmup: int = 5) -> dict[str, dict[str, float]]:
    """Median/p90 seconds per call of each method, timed call by call, methods interleaved per round."""
    times: dict[str, list[float]] = {k: [] for k in methods}
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    clock = time.perf_counter
    for _ in range(rounds):
        for name, fn in methods.items():
            bucket = times[name]
            for _ in range(per_round):
                t0 = clock()
                fn()
                bucket.append(clock() - t0)
    return {k: {"p50": statistics.median(v), "p90": float(np.percentile(v, 90)), "n": len(v)} for k, v in times.items()}
