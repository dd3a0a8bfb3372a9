"""The engine on its own thread, for asyncio servers: requests in, outputs and KV rows out as events.

The engine is synchronous torch code; a gRPC server's event loop must never run it. One thread owns
the `Engine` and runs `step()` whenever there is work; asyncio callers send it commands (add, abort,
reserve, commit...) and read each request's events from an `asyncio.Queue`. Only the engine thread
touches the scheduler. `write_kv` is the exception, by design: it fills pages reserved for one request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moemesh.device import bind_thread, lower_thread_priority, name_os_thread
from moemesh.engine.engine import Engine, Resume
from moemesh.engine.errors import EngineDead
from moemesh.engine.request import RequestOutput, RequestTiming
from moemesh.engine.sampling_params import SamplingParams
from moemesh.ep.group import describe_failure

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0002  # the longest the engine thread waits for the GIL while the event loop holds it


@dataclass(frozen=True)
class KvRows:
    """PD prefill: KV rows [L, N, W] of tokens [token_start, token_start + N), final once emitted."""

    token_start: int
    rows: torch.Tensor


@dataclass(frozen=True)
class Reserved:
    """PD decode: the request's pages are reserved; KV may now be written."""

    timing: RequestTiming | None = None  # the request's timestamps (the engine's object, read-only)


class AsyncEngine:
    def __init__(self, engine: Engine, nice: int = 0, batch_wait_s: float = 0.0) -> None:
        """`batch_wait_s`: how long an idle engine's first new request waits for others arriving with it before the
        step starts (`_gather`); 0: none."""
        self.engine = engine
        self.nice = nice  # added to the engine thread's niceness when it starts (moemesh.device.lower_thread_priority)
        self.batch_wait_s = batch_wait_s
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._prefill_ids: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: BaseException | None = None
        self.failed = asyncio.Event()  # set (on the loop) once the engine thread has failed
        self.load: dict[str, float] = self._snapshot()
        # An EP rank with nothing to do waits this long for work before its next vote: the bound on the
        # latency a new request sees on an idle group, against one tiny all-reduce per tick per rank.
        self.idle_tick_s = 0.005

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        # The engine thread gives the GIL up in every torch op and native call; when the event loop's thread
        # takes it then, the engine thread waits until the loop blocks again or the switch interval (5 ms by
        # default) passes. A short interval bounds that wait: measured on the small benchmark shape, PD, 48
        # prompts, 5 interleaved pairs: median 478 against 444 output tok/s, mean ITL 6.5-7.0 against 7.0-9.4 ms.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop = True
        self._cmds.put(None)  # wake the thread
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # ---- requests ------------------------------------------------------------------------------
    async def generate(self, prompt: Sequence[int], params: SamplingParams, request_id: str,
                       resume: Resume | None = None) -> AsyncIterator[RequestOutput]:
        """Run a request to the end here (colocated); yields its outputs; abandoning the iterator aborts it."""
        q = self._open(request_id)
        try:
            await self._compile_grammar(params)
            await self._call(self.engine.add_request, list(prompt), params, request_id, False, resume)
            async for out in self._events(q, request_id):
                yield out
                if out.finished:
                    return
        finally:
            await self._close(request_id)

    async def prefill(self, prompt: Sequence[int], params: SamplingParams, request_id: str,
                      resume: Resume | None = None) -> AsyncIterator[KvRows | RequestOutput]:
        """PD prefill: yields KvRows as chunks complete, then the first token (`prefill_done`).

        The pages stay held until `release`, which the caller must await once the KV is sent.
        """
        q = self._open(request_id)
        self._prefill_ids.add(request_id)
        try:
            await self._compile_grammar(params)
            await self._call(self.engine.add_request, list(prompt), params, request_id, True, resume)
            async for item in self._events(q, request_id):
                yield item
                if isinstance(item, RequestOutput) and item.prefill_done:
                    return
        finally:
            self._prefill_ids.discard(request_id)
            self._streams.pop(request_id, None)

    async def reserve(self, prompt: Sequence[int], params: SamplingParams, request_id: str,
                      resume: Resume | None = None) -> AsyncIterator[Reserved | RequestOutput]:
        """PD decode: yields Reserved once pages are reserved, then (after `commit`) the outputs."""
        q = self._open(request_id)
        try:
            await self._compile_grammar(params)
            await self._call(self.engine.reserve_request, list(prompt), params, request_id, resume)
            async for item in self._events(q, request_id):
                yield item
                if isinstance(item, RequestOutput) and item.finished:
                    return
        finally:
            await self._close(request_id)

    async def _compile_grammar(self, params: SamplingParams) -> None:
        """Compile a structured-output request's grammar in a worker thread: the engine thread then finds it in
        the compiler's cache instead of stalling every other request's steps on it."""
        if params.structured_output is not None:
            await asyncio.to_thread(self.engine.grammars.compile, params.structured_output)

    def write_kv(self, request_id: str, token_start: int, rows: torch.Tensor) -> None:
        """PD decode: store received rows into the reserved pages (any thread; see the module doc)."""
        self.engine.write_kv(request_id, token_start, rows)

    async def commit(self, request_id: str, token: int, logprob: float | None,
                     top: list[tuple[int, float]] | None) -> None:
        """PD decode: the KV is complete; decoding starts from the prefill's first token."""
        await self._call(self._commit, request_id, token, logprob, top)

    def _commit(self, request_id: str, token: int, logprob: float | None,
                top: list[tuple[int, float]] | None) -> None:
        # On the engine thread: the first token is posted before any step can post the second one
        # (delivering it from the awaiting coroutine let a fast step's output overtake it).
        out = self.engine.commit_transfer(request_id, token, logprob, top)
        self._post(self._deliver, request_id, out)

    async def release(self, request_id: str) -> None:
        """PD prefill: the held pages go back (into the prefix cache)."""
        await self._call(self.engine.release, request_id)

    async def offer_placement(self, version: int, phy2log: torch.Tensor) -> None:
        """EP group: the balancer's new placement; the group switches once every rank has it."""
        if self.engine.ep is None:
            raise ValueError("this engine is not part of an EP group")
        await self._call(self.engine.ep.offer, version, phy2log)

    async def abort(self, request_id: str) -> bool:
        if not self.alive:
            return False
        return bool(await self._call(self.engine.abort, request_id))

    # ---- plumbing ------------------------------------------------------------------------------
    def _open(self, request_id: str) -> asyncio.Queue:
        if not self.alive:
            raise EngineDead(f"the engine is not running: {self.error!r}")
        if request_id in self._streams:
            from moemesh.engine.sampling_params import InvalidParameter

            raise InvalidParameter(f"request_id {request_id!r} is already in use")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        return q

    async def _close(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        # Whatever ended the iteration early (client gone, error), the engine must forget the request.
        await self.abort(request_id)

    async def _events(self, q: asyncio.Queue, request_id: str) -> AsyncIterator[Any]:
        while True:
            item = await q.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def _call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        assert self._loop is not None
        fut = self._loop.create_future()
        self._cmds.put((fn, args, fut))
        return fut

    def _deliver(self, request_id: str, item: Any) -> None:
        q = self._streams.get(request_id)
        if q is not None:
            q.put_nowait(item)

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._deliver(out.request_id, out)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn, *args)

    def _settle(self, fut: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    # ---- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            bind_thread(self.engine.cfg.device)  # CUDA's current device is per thread; this one steps
            name_os_thread("engine")
            if self.nice and not lower_thread_priority(self.nice):
                log.warning("could not lower the engine thread's priority by %d", self.nice)
            if self.engine.ep is None:
                self._run_alone()
            else:
                self._run_in_group()
        except BaseException as e:  # a bug, or a peer rank gone: fail every request rather than hang them
            log.exception("engine thread failed")
            self.error = e
            if self.engine.ep is not None:
                dead = EngineDead(describe_failure(self.engine.ep.rank, self.engine.ep.size, e))
            else:
                dead = EngineDead(f"the engine failed: {type(e).__name__}: {e}")
            for rid in list(self._streams):
                self._post(self._deliver, rid, dead)
            self._fail_pending(dead)
            self._post(self.failed.set)

    def _run_alone(self) -> None:
        while not self._stop:
            idle = not self.engine.scheduler.has_work
            self._drain_commands(0.5 if idle else 0)
            if idle and self.batch_wait_s > 0 and self.engine.scheduler.has_work:
                self._gather(time.monotonic() + self.batch_wait_s)
            if self._stop or not self.engine.scheduler.has_work:
                continue
            self._publish(self.engine.step())

    def _gather(self, deadline: float) -> None:
        """Take the commands that arrive until `deadline`: a client's concurrent requests reach an idle worker a few
        milliseconds apart, and a step started on the first alone would make the others wait for all of it before
        theirs (measured on the small benchmark shape: the first of four prompts' first token at ~55 ms, the other
        three's at ~185 ms, where one step of all four takes ~130)."""
        while not self._stop and (left := deadline - time.monotonic()) > 0:
            self._drain_commands(left)

    def _run_in_group(self) -> None:
        """Lockstep with the other ranks: vote, then all run a forward (empty ones too) or all skip it.

        A stopping rank keeps voting (and joining forwards) until every rank is stopping, so that its
        peers' collectives never wait on a rank that has left.
        """
        ep, engine = self.engine.ep, self.engine
        busy = False
        while True:
            self._drain_commands(0 if busy or engine.scheduler.has_work else self.idle_tick_s)
            batch = engine.schedule() if not self._stop and engine.scheduler.has_work else None
            vote = ep.vote(batch is not None, engine.can_split(batch), self._stop)
            if vote.all_stopping:
                return
            ep.advance(vote)  # a placement switch moves one MoE layer's experts per step boundary
            busy = vote.any_batch
            if busy:
                self._publish(engine.execute(batch, vote.split))
            elif engine.scheduler.newly_reserved:
                self._publish([])

    def _publish(self, outputs: list[RequestOutput]) -> None:
        """After a step: reservations, KV rows and outputs to their streams; load for scrapes."""
        for rid in self.engine.take_reserved():
            req = self.engine.requests.get(rid)
            self._post(self._deliver, rid, Reserved(req.timing if req is not None else None))
        self._emit_kv_rows()
        if outputs:
            # One wake-up of the loop for the whole step: a call per output made the event loop's thread take
            # the GIL once per token, each time while this thread wanted it back for the next step.
            self._post(self._deliver_all, outputs)
        self.load = self._snapshot()
        if self.engine.expert_load is not None:
            # Counters to the host at most once a second, and when the engine goes idle.
            self.engine.expert_load.maybe_readout(force=not self.engine.scheduler.has_work)

    def _drain_commands(self, wait_s: float) -> None:
        try:
            cmd = self._cmds.get(timeout=wait_s) if wait_s > 0 else self._cmds.get_nowait()
        except queue.Empty:
            return
        while cmd is not None:
            fn, args, fut = cmd
            try:
                result = fn(*args)
                self._post(self._settle, fut, result)
            except Exception as e:
                self._post(self._settle, fut, None, e)
            self.load = self._snapshot()
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return

    def _fail_pending(self, error: BaseException) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd is not None:
                self._post(self._settle, cmd[2], None, error)

    def _emit_kv_rows(self) -> None:
        """Hand every prefill request's newly computed rows to its sender while the next chunk runs."""
        for rid in list(self._prefill_ids):
            req = self.engine.requests.get(rid)
            if req is None or req.num_computed <= req.num_kv_emitted:
                continue
            rows = self.engine.read_kv(rid, req.num_kv_emitted, req.num_computed)
            self._post(self._deliver, rid, KvRows(req.num_kv_emitted, rows))
            req.num_kv_emitted = req.num_computed

    def _snapshot(self) -> dict[str, float]:
        s = self.engine.scheduler
        return {
            "num_running": len(s.running), "num_waiting": len(s.waiting) + len(s.prefilling) + len(s.reserving),
            "num_transferring": len(s.transferring) + len(s.held), "num_free_pages": s.num_free_pages,
            "num_pages": s.cfg.num_pages, "prefix_cache_hit_rate": s.cache.hit_rate,
        }
