"""A serving process's Python heap: what lives as long as the process is kept out of the garbage collector's way.

A service's start-up leaves tens to hundreds of thousands of long-lived objects (measured: kvtransfer 46k, the
gateway 86k, the balancer 204k, a worker 341k: torch's modules and the model's, the tokenizer, gRPC, FastAPI,
protobuf descriptors). CPython's full collections walk every one of them: in a prefill worker under load one took
245 ms, and the gateway's 133 ms, each stalling every thread of the process (the GIL is held) and with it the
requests in flight. Once a service is ready, one collection and `gc.freeze()` move what survived into the
permanent generation: later collections walk only what serving allocated since. The settling itself costs one
pause at start-up (50-340 ms, the worker's the longest). Frozen objects are still freed when their last reference
goes; only a cycle among them would never be collected, and start-up objects live as long as the process anyway.

Only for a process that is the service (`run_settled`): a test that starts services in its own process keeps
its collector as it is.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)


def settle() -> int:
    """Collect once, then freeze every surviving object out of later collections; returns how many were frozen."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("heap settled: %d objects frozen in %.0f ms", frozen, (time.perf_counter() - t0) * 1000)
    return frozen


def run_settled(serve: Callable[..., Awaitable[None]], *args: Any) -> None:
    """`asyncio.run(serve(*args, ready=event))`, settling the heap (`settle`) once the service sets `ready`."""

    async def main() -> None:
        ready = asyncio.Event()

        async def settle_when_ready() -> None:
            await ready.wait()
            settle()

        settling = asyncio.create_task(settle_when_ready(), name="heap-settle")
        try:
            await serve(*args, ready=ready)
        finally:
            settling.cancel()

    asyncio.run(main())
