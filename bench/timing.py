"""Timing helpers shared by the benchmarks (no torch, so parsers can import their modules cheaply)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """The shortest wall time of `repeats` calls of `fn`, in seconds: the least disturbed by a shared machine."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def mean_time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 2, iters: int = 10) -> float:
    """Mean milliseconds per call of `fn` after `warmup` calls (first-call allocations, kernel selection, JIT):
    CUDA events around the calls on a GPU (kernel launches are asynchronous, so a host clock would time the
    launches), the wall clock elsewhere."""
    import torch

    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters
