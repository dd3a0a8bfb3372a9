"""Timing helpers shared by the benchmarks (no torch, so parsers can import their modules cheaply)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """The shortest wall time of `repeats` calls of `fn`, in seconds: the least disturbed by a shared machine."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
