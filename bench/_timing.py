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


def write_results(path: "Any", out: dict[str, Any]) -> int:
    """Write a bench's JSON (with the machine it ran on) and say where; the scripts' exit code."""
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415
    import platform  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**out, "machine": platform.platform(), "cpus": os.cpu_count()}, indent=2))
    print(f"wrote {path}")
    return 0
