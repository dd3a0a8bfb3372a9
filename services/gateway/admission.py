"""Admission at the gateway: a bounded number of requests in flight, a bounded wait, and KV pages.

The gateway asks before a request goes to any worker, and holds the answer until the request ends:

    permit = await admission.acquire(len(prompt_token_ids))   # or ResourceExhausted: 429 / RESOURCE_EXHAUSTED
    try:
        ...                                                     # route, fan out, stream
    finally:
        permit.release()                                        # idempotent; `async with permit:` too

A request is admitted when fewer than `max_concurrent_requests` hold a permit and some routable decode
worker has the free KV pages its prompt needs (`WorkerEntry.free_pages`: its last report, less what was
sent to it since). A worker that has not reported its pages yet counts as having them, and so does the
lack of any routable worker: the router then refuses with UNAVAILABLE and says why.

Otherwise the request waits, first come first served, for at most `max_queue_wait_ms` (0, the default:
not at all), and only if fewer than `max_queued_requests` already wait; then it is refused with a retry
hint. So a flood costs the gateway a bounded number of requests in memory, and each one beyond them a
quick refusal, never an unbounded queue (the workers bound theirs too: `--max-waiting-requests`).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

from moemesh.service.errors import DEFAULT_RETRY_AFTER_S, ResourceExhausted
from moemesh.services.gateway.registry import WorkerEntry
from moemesh.services.gateway.router import fits

DEFAULT_MAX_CONCURRENT_REQUESTS = 1024
# Free pages change with heartbeats, which nobody announces: a waiter for pages looks again this often.
KV_POLL_S = 0.05


@dataclass(frozen=True)
class AdmissionConfig:
    """The gateway's admission limits.

    `max_concurrent_requests`: requests holding a permit at most (in flight from admission to their end).
    `max_queue_wait_ms`: how long a request may wait for a slot or for KV pages (0: refused at once).
    `max_queued_requests`: requests waiting at most (None: as many as `max_concurrent_requests`).
    `retry_after_s`: the hint a refusal carries. `kv_admission`: refuse prompts no decode worker has
    the free KV pages for.
    """

    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS
    max_queue_wait_ms: int = 0
    max_queued_requests: int | None = None
    retry_after_s: float = DEFAULT_RETRY_AFTER_S
    kv_admission: bool = True

    def __post_init__(self) -> None:
        if self.max_concurrent_requests < 1:
            raise ValueError(f"max_concurrent_requests must be >= 1, got {self.max_concurrent_requests}")
        if self.max_queue_wait_ms < 0:
            raise ValueError(f"max_queue_wait_ms must be >= 0, got {self.max_queue_wait_ms}")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        if not (math.isfinite(self.retry_after_s) and self.retry_after_s > 0):
            raise ValueError(f"retry_after_s must be > 0, got {self.retry_after_s}")

    @property
    def queue_bound(self) -> int:
        """Requests that may wait at once."""
        return self.max_concurrent_requests if self.max_queued_requests is None else self.max_queued_requests


def add_admission_arguments(parser: argparse.ArgumentParser) -> None:
    """The gateway's admission options (each also MOEMESH_<DEST>, once `apply_env_defaults` runs after)."""
    d = AdmissionConfig()
    g = parser.add_argument_group("admission")
    g.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests,
                   help="requests in flight at most; more wait (--max-queue-wait-ms) or are refused with "
                        "429 / RESOURCE_EXHAUSTED and a retry hint (default: %(default)s)")
    g.add_argument("--max-queue-wait-ms", type=int, default=d.max_queue_wait_ms,
                   help="how long a request may wait for a slot or for free KV pages on a decode worker; "
                        "0 refuses at once (default: %(default)s)")
    g.add_argument("--no-kv-admission", action="store_true",
                   help="admit prompts even when no decode worker reports the free KV pages they need "
                        "(the workers queue them, up to their --max-waiting-requests)")


def admission_config(args: argparse.Namespace) -> AdmissionConfig:
    """The AdmissionConfig of parsed `add_admission_arguments` options (ValueError for bad values)."""
    return AdmissionConfig(max_concurrent_requests=args.max_concurrent_requests,
                           max_queue_wait_ms=args.max_queue_wait_ms, kv_admission=not args.no_kv_admission)


def prompt_pages(worker: WorkerEntry, num_tokens: int) -> int | None:
    """KV pages a prompt of `num_tokens` takes on `worker`; None when it has not said (no layout or load)."""
    page_size = worker.kv_layout.page_size_tokens
    if not page_size or not worker.load.num_total_pages:
        return None
    return -(-num_tokens // page_size)


class Permit:
    """One admitted request's slot: `release` (idempotent) gives it back; usable as a context manager."""

    __slots__ = ("_admission", "_released", "waited_s")

    def __init__(self, admission: Admission, waited_s: float) -> None:
        self._admission = admission
        self._released = False
        self.waited_s = waited_s  # how long the request queued for it (0.0: admitted at once)

    @property
    def waited(self) -> bool:
        """True when the request queued: what was decided before (e.g. its route) may be stale."""
        return self.waited_s > 0

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._on_release()

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    async def __aenter__(self) -> Permit:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()


class Admission:
    """Permits for requests, within AdmissionConfig's limits; `decode_workers` lists the registry's
    decode workers (e.g. `lambda: registry.workers(DECODE)`) for the KV check."""

    def __init__(self, cfg: AdmissionConfig | None = None,
                 decode_workers: Callable[[], Sequence[WorkerEntry]] = tuple) -> None:
        self.cfg = cfg if cfg is not None else AdmissionConfig()
        self._decode_workers = decode_workers
        self.num_in_flight = 0
        self.num_admitted = 0
        self.num_refused = 0
        self._waiters: deque[object] = deque()  # one token per waiting request, first come first
        self._changed = asyncio.Event()  # set (then replaced) whenever a waiter might now go

    @property
    def num_waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self, num_prompt_tokens: int) -> Permit:
        """A permit now, or ResourceExhausted (never waits; refuses while others wait, to keep the order)."""
        why = self._why_not(num_prompt_tokens) if not self._waiters else self._queue_ahead()
        if why is None:
            return self._grant(0.0)
        raise self._refuse(why)

    async def acquire(self, num_prompt_tokens: int) -> Permit:
        """A permit, after waiting at most `max_queue_wait_ms`; else ResourceExhausted with a retry hint.

        Cancelling the wait leaves nothing behind.
        """
        why = self._why_not(num_prompt_tokens) if not self._waiters else self._queue_ahead()
        if why is None:
            return self._grant(0.0)
        wait_s = self.cfg.max_queue_wait_ms / 1000
        if wait_s <= 0:
            raise self._refuse(why)
        if len(self._waiters) >= self.cfg.queue_bound:
            raise self._refuse(f"{len(self._waiters)} requests already wait for a slot, as many as may wait"
                               if self._waiters else why)
        me = object()
        self._waiters.append(me)
        start = time.monotonic()
        try:
            while True:
                changed = self._changed  # taken before looking: a change after the look wakes us
                if self._waiters[0] is me:
                    why = self._why_not(num_prompt_tokens)
                    if why is None:
                        return self._grant(max(time.monotonic() - start, 1e-9))
                remaining = start + wait_s - time.monotonic()
                if remaining <= 0:
                    why = self._why_not(num_prompt_tokens) or self._queue_ahead(me)
                    raise self._refuse(f"{why}; waited {self.cfg.max_queue_wait_ms} ms")
                try:
                    await asyncio.wait_for(changed.wait(), min(remaining, KV_POLL_S))
                except asyncio.TimeoutError:
                    pass
        finally:
            self._waiters.remove(me)
            self._notify()  # the next in line may go now

    def release(self, permit: Permit) -> None:
        """Same as `permit.release()`."""
        permit.release()

    # ---- internals -----------------------------------------------------------------------------
    def _grant(self, waited_s: float) -> Permit:
        self.num_in_flight += 1
        self.num_admitted += 1
        return Permit(self, waited_s)

    def _on_release(self) -> None:
        self.num_in_flight -= 1
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _refuse(self, why: str) -> ResourceExhausted:
        self.num_refused += 1
        hint = self.cfg.retry_after_s
        return ResourceExhausted(f"the mesh is at capacity: {why}; retry in about {hint:g} s", retry_after_s=hint)

    def _queue_ahead(self, me: object | None = None) -> str:
        ahead = self._waiters.index(me) if me is not None else len(self._waiters)
        return f"{ahead} earlier requests still wait for a slot"

    def _why_not(self, num_prompt_tokens: int) -> str | None:
        """Why a request of this prompt cannot have a permit now; None when it can."""
        limit = self.cfg.max_concurrent_requests
        if self.num_in_flight >= limit:
            return f"{self.num_in_flight} requests are in flight, the gateway's limit (--max-concurrent-requests)"
        if self.cfg.kv_admission:
            return self._kv_shortage(num_prompt_tokens)
        return None

    def _kv_shortage(self, num_tokens: int) -> str | None:
        """Why no decode worker can hold the prompt's KV now; None when one can (or none is routable)."""
        best: tuple[int, WorkerEntry, int] | None = None  # (free pages, worker, pages needed there)
        for worker in self._decode_workers():
            if not (worker.routable and fits(worker, num_tokens)):
                continue
            need = prompt_pages(worker, num_tokens)
            if need is None or worker.free_pages >= need:
                return None
            if best is None or worker.free_pages > best[0]:
                best = (worker.free_pages, worker, need)
        if best is None:
            return None
        free, worker, need = best
        return (f"no decode worker has the {need} free KV pages a prompt of {num_tokens} tokens needs "
                f"(the most free: {max(free, 0)} on {worker.worker_id})")
