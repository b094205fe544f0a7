"""Timing a step function in measurement windows until its median settles (perf_analyzer's rule).

Every step is timed on its own (``perf_counter_ns``). A *window* is a run of steps: a fixed count, or as
many as fit in a number of seconds (at least ``MIN_WINDOW_STEPS``, so that a slow step still gives a
median). Windows repeat until the medians of the last ``STABLE_WINDOWS`` windows lie within
``stability`` of each other (max/min - 1, as perf_analyzer's ``--stability-percentage``) or
``max_windows`` have run; the result says whether it settled. Statistics come from every sample of those
last windows: the earlier ones are what it took to settle (frequency ramps, caches, a neighbour's burst),
which a steady-state figure must not include.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

STABLE_WINDOWS = 3
MIN_WINDOW_STEPS = 5
PERCENTILES = (50, 90, 95, 99)


def latency_stats(samples_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p95/p99/max/min/mean in milliseconds, from every sample (numpy's linear interpolation)."""
    arr = np.asarray(samples_s, dtype=np.float64) * 1e3
    if arr.size == 0:
        raise ValueError("latency_stats: no samples")
    pct = np.percentile(arr, PERCENTILES)
    out = {f"p{p}_ms": float(v) for p, v in zip(PERCENTILES, pct)}
    out.update(max_ms=float(arr.max()), min_ms=float(arr.min()), mean_ms=float(arr.mean()))
    return out


def spread(values: Sequence[float]) -> float:
    """max/min - 1: 0.0 for identical values (the stability measure)."""
    lo = min(values)
    return float("inf") if lo <= 0 else max(values) / lo - 1.0


def settles(windows: Sequence["Window"], stability: float) -> bool:
    """Whether the last ``STABLE_WINDOWS`` window medians agree within ``stability`` (a fraction)."""
    return len(windows) >= STABLE_WINDOWS and spread([w.p50_s for w in windows[-STABLE_WINDOWS:]]) <= stability


@dataclass
class Window:
    samples_s: list[float]
    wall_s: float  # the window's wall time, gaps between steps included (what a loop gets per second)

    @property
    def p50_s(self) -> float:
        return float(np.median(self.samples_s))


@dataclass
class Timing:
    """The outcome of :func:`measure`: all windows, the ones reported, and whether they settled."""

    windows: list[Window]
    settled: bool
    warmup: int
    reported: list[Window] = field(default_factory=list)

    @property
    def samples_s(self) -> list[float]:
        return [s for w in self.reported for s in w.samples_s]

    @property
    def steps(self) -> int:
        """Steps taken in total, warm-up and every window included (how far the state moved)."""
        return self.warmup + sum(len(w.samples_s) for w in self.windows)

    @property
    def steps_per_s(self) -> float:
        return sum(len(w.samples_s) for w in self.reported) / sum(w.wall_s for w in self.reported)

    @property
    def stability(self) -> float:
        return spread([w.p50_s for w in self.reported])

    @classmethod
    def of(cls, windows: list[Window], stability: float, warmup: int) -> "Timing":
        """The timing of ``windows`` (their last ``STABLE_WINDOWS`` reported): settled when those medians
        agree within ``stability``."""
        return cls(windows, settles(windows, stability), warmup, windows[-STABLE_WINDOWS:])

    def to_dict(self) -> dict[str, Any]:
        return {"windows": len(self.windows), "settled": self.settled, "stability": self.stability,
                "window_p50_ms": [w.p50_s * 1e3 for w in self.windows],
                "samples": len(self.samples_s), "steps_carried": self.steps}


def measure(step: Callable[[], Any], *, warmup: int, window_steps: int | None, window_seconds: float,
            stability: float, max_windows: int,
            on_window: Callable[[int, float], None] | None = None) -> Timing:
    """Run ``step`` ``warmup`` times untimed, then in timed windows until settled or ``max_windows``.

    ``window_steps`` fixes the steps per window; ``None`` fills each window for ``window_seconds``.
    ``on_window(i, p50_s)`` is told after each window (for a progress bar).
    """
    for _ in range(warmup):
        step()
    clock = time.perf_counter_ns
    windows: list[Window] = []
    while len(windows) < max_windows:
        samples: list[float] = []
        start = clock()
        deadline = start + int(window_seconds * 1e9)
        while True:
            t0 = clock()
            step()
            t1 = clock()
            samples.append((t1 - t0) * 1e-9)
            if window_steps is not None:
                if len(samples) >= window_steps:
                    break
            elif t1 >= deadline and len(samples) >= MIN_WINDOW_STEPS:
                break
        windows.append(Window(samples, (clock() - start) * 1e-9))
        if on_window is not None:
            on_window(len(windows), windows[-1].p50_s)
        if settles(windows, stability):
            break
    return Timing.of(windows, stability, warmup)
