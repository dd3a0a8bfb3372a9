"""One request's fan-out: decode and prefill called at once with a shared room, decode's stream relayed.

A request's lifecycle, hop by hop: where it is, which file holds that step, and the state it is in.
(Engine states are `moemesh.engine.request.RequestStatus`; room states are kvtransfer's `RoomState`, polled
by both workers: BOOTSTRAPPING -> WAITING_FOR_INPUT -> TRANSFERRING -> SUCCESS | FAILED.)

 1. Edge. REST `POST /v1/chat/completions` (services/gateway/rest/chat.py) or gRPC `Gateway.Generate`
    (services/gateway/servicer.py) -> `GatewayCore.open` (core.py): the chat template and tokenization
    (inputs.py), validation, a request id and a deadline. Errors here are 4xx / INVALID_ARGUMENT before any
    stream exists.
 2. Route. The router policy (router.py; `--router`, default prefix_affinity) picks a decode worker (most
    free KV pages, fewest running) and a prefill worker (prefix-cache affinity, then shortest queue) among
    the registered, healthy, layout-compatible ones (registry.py, fed by the workers' heartbeats). No prefill
    worker, or kvtransfer away (pd_health.py): the decode worker runs the request colocated (no room).
 3. Admission. `Admission.acquire` (admission.py): bounded in-flight requests and KV pages, else
    RESOURCE_EXHAUSTED with a retry hint.
 4. Fan-out (this file, `Exchange.run`). A fresh room id; `Decode.Generate` and `Prefill.PrefillStream` are sent
    at once with that room and one worker-side request id. The gateway does not sequence the two sides.
 5. Decode reserves (services/decode/servicer.py -> `Engine.reserve`): the request waits for pages
    (RESERVING), then registers the room's receiver at kvtransfer (`RegisterReceiver`: its data-plane
    address, KV layout, token count; room WAITING_FOR_INPUT) and waits for the KV (TRANSFERRING).
 6. Prefill computes (services/prefill/servicer.py -> `Engine.prefill`): chunked prefill over its own paged
    cache (PREFILLING, then HELD after sampling the first token), resolving the room's receiver at kvtransfer
    meanwhile (`ResolveReceiver`: layouts checked field by field; room TRANSFERRING).
 7. KV handoff (shared/transfer/: the data plane chosen by the receiver, UCX or the kvtransfer relay): each
    prefill chunk's KV rows go out as soon as they are computed, CRC-checked, written straight into the
    decode worker's reserved pages (`Engine.write_kv`); the last chunk carries the first token.
 7b. Early first token: when the prefill worker knows the decode worker's first output will be exactly its
    first token and text (no stop string, no resume; `Engine._early_text`), it streams them to the gateway at
    once and the gateway relays them to the client; decode's first output then goes out without them.
 8. Decode runs: the receiver reports SUCCESS, the engine commits the first token (RUNNING) and the request
    joins the continuous batch; each step's tokens stream back as `DecodeResponse`s, relayed here to the
    client (core.py adds usage, metrics and the finish reason). The prefill worker frees its pages.
 9. End. A finish reason ends both calls. A client cancel, a deadline or a failure of either side cancels
    and aborts the request on both workers (`AbortSender`); either side reports a failed room so the other
    stops waiting, and leases end what nobody reports. A worker that dies or breaks its stream mid-request:
    the request migrates (core.py `_migration_route`) to another pair with the tokens already streamed.

As in SGLang's PD router, the gateway only watches both calls: a failed prefill ends the attempt at once
(the decode side would otherwise wait for KV until its deadline), and an attempt that ends abnormally is
cancelled and aborted on both workers.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from opentelemetry.context import Context

from moemesh.service.errors import DeadlineExceeded, ServiceError, Unavailable, is_peer_failure
from moemesh.services.gateway.inputs import PreparedRequest
from moemesh.services.gateway.registry import WorkerEntry, WorkerRegistry
from moemesh.services.gateway.router import Route
from moemesh.telemetry.tracing import attached
from moemesh.v1 import common_pb2, decode_pb2, gateway_pb2, prefill_pb2

log = logging.getLogger(__name__)

# How long a worker may take to end its stream after the last message before the call is cancelled.
STREAM_CLOSE_GRACE_S = 1.0
# How long a finished request waits for prefill's reply (its cached-prefix count) when decode finished first.
PREFILL_REPLY_GRACE_S = 1.0
# Abort is a courtesy after a cancel (which already reached the worker if it could): keep it short.
ABORT_TIMEOUT_S = 2.0


class DownstreamError(ServiceError):
    """A worker's own error status, relayed with its code and the worker named."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


class WorkerStreamBroken(ServiceError):
    """A worker's stream ended without finishing the request (the request may continue elsewhere)."""

    code = grpc.StatusCode.UNAVAILABLE


class AbortSender:
    """Best-effort Abort RPCs, sent in the background so a cancelled request never waits on them."""

    def __init__(self, registry: WorkerRegistry) -> None:
        self._registry = registry
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, worker: WorkerEntry, request_id: str) -> None:
        # Counted in flight so that a removed worker's channel stays open until the abort is sent.
        self._registry.acquire(worker)
        task = asyncio.get_running_loop().create_task(self._abort(worker, request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for the aborts still being sent (on shutdown)."""
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _abort(self, worker: WorkerEntry, request_id: str) -> None:
        try:
            await worker.stub().Abort(common_pb2.AbortRequest(request_id=request_id), timeout=ABORT_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            log.debug("abort of %s on %s failed: %s", request_id, worker.name, exc.code())
        finally:
            self._registry.release(worker)


class Exchange:
    """The downstream calls of one request; iterate `run()` for the client's responses."""

    def __init__(self, registry: WorkerRegistry, aborts: AbortSender, route: Route, request: PreparedRequest,
                 room_id: str, timeout_s: float, trace_context: Context | None = None,
                 resume_token_ids: list[int] | None = None, resume_text_chars: int = 0) -> None:
        """`trace_context`: the request's span context, carried to both workers (default: the current one).
        `resume_token_ids` / `resume_text_chars`: a migrated request's outputs the client already has."""
        self.registry = registry
        self.aborts = aborts
        self.route = route
        self.request = request
        self.room_id = room_id
        self.timeout_s = timeout_s
        self.prefill_response: prefill_pb2.PrefillResponse | None = None
        # The workers' key for this attempt: the client's id (for their logs) made unique, so that clients
        # reusing an id, or an abort of a failed attempt, never touch another request or attempt.
        self.worker_request_id = f"{request.request_id}@{uuid.uuid4().hex[:12]}"
        self.resume_token_ids = list(resume_token_ids or ())
        self.resume_text_chars = resume_text_chars
        self.completion_tokens = len(self.resume_token_ids)  # usage counts the whole request's outputs
        self.trace_context = trace_context
        # Prompt logprobs go out with the first response; in PD the prefill worker computed them.
        self._prompt_logprobs_due = request.sampling.HasField("prompt_logprobs") and not self.resume_token_ids

    async def run(self) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """Call both workers, relay decode's stream; raises a ServiceError when either side fails.

        In PD the prefill worker's first token goes to the client as soon as it is sampled, when the prefill
        worker says the decode worker's first output will repeat it (`PrefillStream`'s `first` event): that output
        then goes out without it. Otherwise the first token comes with decode's stream, after the KV handoff.
        """
        req = self.request
        decode = self.route.decode
        prefill_call: Any = None
        prefill_task: asyncio.Future[Any] | None = None  # the prefill stream's next event
        # The calls' interceptors (which write `traceparent`) run in tasks that copy the context now.
        with attached(self.trace_context):
            decode_call = decode.stub().Generate(decode_pb2.DecodeRequest(
                request_id=self.worker_request_id, prompt_token_ids=req.prompt_token_ids, sampling=req.sampling,
                room_id=self.room_id, resume_token_ids=self.resume_token_ids,
                resume_text_chars=self.resume_text_chars), timeout=self.timeout_s)
            if self.route.prefill is not None:
                prefill_call = self.route.prefill.stub().PrefillStream(prefill_pb2.PrefillRequest(
                    request_id=self.worker_request_id, room_id=self.room_id, prompt_token_ids=req.prompt_token_ids,
                    sampling=req.sampling, resume_token_ids=self.resume_token_ids,
                    resume_text_chars=self.resume_text_chars), timeout=self.timeout_s)
                prefill_task = asyncio.ensure_future(prefill_call.read())
        read: asyncio.Future[Any] = asyncio.ensure_future(decode_call.read())
        ok = False  # the request finished: nothing to cancel or abort
        early: prefill_pb2.FirstTokenEvent | None = None  # the first token, sent before decode's stream had it
        relayed = False  # a response went to the client
        try:
            while True:
                waiting = {read} if prefill_task is None or self.prefill_response is not None \
                    else {read, prefill_task}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if prefill_task is not None and prefill_task in done and self.prefill_response is None:
                    first = self._prefill_event(prefill_task)
                    if self.prefill_response is None:
                        prefill_task = asyncio.ensure_future(prefill_call.read())
                    if first is not None and not relayed and not self._prompt_logprobs_due:
                        early = first
                        relayed = True
                        yield self._early_response(first)
                if read not in done:
                    continue
                msg = self._decode_result(read)
                if msg is grpc.aio.EOF:
                    broken = WorkerStreamBroken(f"{decode.name} ended the stream without a finish reason")
                    broken.worker_id = decode.worker_id
                    raise broken
                ok = msg.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
                if not ok:
                    read = asyncio.ensure_future(decode_call.read())
                if early is not None and len(msg.token_ids):
                    msg = self._without_early(msg, early)
                    early = None
                    if not len(msg.token_ids) and not msg.text and not ok:
                        continue  # it only repeated the first token
                if self._prompt_logprobs_due and prefill_task is not None and self.prefill_response is None:
                    # They come in prefill's reply, which follows the KV decode already has: wait for it.
                    prefill_task = await self._await_prefill_reply(prefill_call, prefill_task, None)
                elif ok and prefill_task is not None and self.prefill_response is None:
                    prefill_task = await self._await_prefill_reply(prefill_call, prefill_task, PREFILL_REPLY_GRACE_S)
                relayed = True
                yield self._response(msg, ok)
                if ok:
                    await _close_gracefully(decode_call)
                    return
        finally:
            _settle(read)
            decode_call.cancel()  # a no-op on a finished call
            if not ok:
                self.aborts.send(decode, self.worker_request_id)
            if prefill_task is not None:
                if self.prefill_response is None or not ok:
                    prefill_call.cancel()
                    self.aborts.send(self.route.prefill, self.worker_request_id)
                _settle(prefill_task)

    async def _await_prefill_reply(self, call: Any, task: asyncio.Future[Any], timeout_s: float | None
                                   ) -> asyncio.Future[Any]:
        """Wait for prefill's reply (after a first-token event, if one is still to come); returns the stream's
        last read (the caller settles it).

        With a timeout: decode finished before the reply came (a short request; the reply follows the KV it
        already sent). It carries the cached prefix the usage reports; any failure of it now is moot: the request
        is done. Without: the reply carries prompt logprobs the first response needs, and its failure is the
        request's."""
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        while self.prefill_response is None:
            left = None if deadline is None else deadline - asyncio.get_running_loop().time()
            if left is not None and left <= 0:
                break
            await asyncio.wait({task}, timeout=left)
            if not task.done():
                break
            try:
                self._prefill_event(task)
            except Exception:
                if timeout_s is None:
                    raise
                break
            if self.prefill_response is None:
                task = asyncio.ensure_future(call.read())
        return task

    def _prefill_event(self, task: asyncio.Future[Any]) -> prefill_pb2.FirstTokenEvent | None:
        """The prefill stream's event in `task`: keeps its reply (`done`), returns a first-token event."""
        event = self._prefill_result(task)
        if event is grpc.aio.EOF:
            broken = WorkerStreamBroken(f"{self.route.prefill.name} ended the stream without a reply")
            broken.worker_id = self.route.prefill.worker_id
            raise broken
        if event.WhichOneof("event") == "done":
            self.prefill_response = event.done
            return None
        return event.first if event.HasField("first") else None

    def _early_response(self, first: prefill_pb2.FirstTokenEvent) -> gateway_pb2.GenerateResponse:
        self.completion_tokens += 1
        return gateway_pb2.GenerateResponse(
            request_id=self.request.request_id, token_ids=[first.token_id], text=first.text,
            logprobs=[first.logprobs] if first.HasField("logprobs") else [])

    def _without_early(self, msg: decode_pb2.DecodeResponse, first: prefill_pb2.FirstTokenEvent
                       ) -> decode_pb2.DecodeResponse:
        """Decode's first output less the first token the client already has (its text is a prefix of it)."""
        if msg.token_ids[0] != first.token_id or not msg.text.startswith(first.text):
            raise DownstreamError(
                f"{self.route.decode.name} began with token {msg.token_ids[0]} {msg.text!r}, not the prefill "
                f"worker's {first.token_id} {first.text!r}", grpc.StatusCode.INTERNAL)
        rest = decode_pb2.DecodeResponse()
        rest.CopyFrom(msg)
        del rest.token_ids[0]
        rest.text = msg.text[len(first.text):]
        if len(rest.logprobs):
            del rest.logprobs[0]
        return rest

    def _prefill_result(self, task: asyncio.Future[Any]) -> prefill_pb2.PrefillResponse:
        if task.cancelled():
            raise Unavailable(f"the call to {self.route.prefill.name} was cancelled")
        exc = task.exception()
        if exc is None:
            return task.result()
        raise self._mapped(self.route.prefill, exc)

    def _decode_result(self, read: asyncio.Future[Any]) -> Any:
        if read.cancelled():
            raise Unavailable(f"the call to {self.route.decode.name} was cancelled")
        exc = read.exception()
        if exc is None:
            return read.result()
        raise self._mapped(self.route.decode, exc)

    def _mapped(self, worker: WorkerEntry, exc: BaseException) -> BaseException:
        """The ServiceError for `worker`'s failure, with `worker_id` naming it (a migration avoids it)."""
        mapped = self._map(worker, exc)
        if isinstance(mapped, ServiceError):
            mapped.worker_id = worker.worker_id
        return mapped

    def _map(self, worker: WorkerEntry, exc: BaseException) -> BaseException:
        if not isinstance(exc, grpc.aio.AioRpcError):
            return exc
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            if is_peer_failure(exc.trailing_metadata()):
                # The worker answered and is fine; what failed was its side of the handoff. It stays
                # routable for other requests (this one still moves away from it).
                return Unavailable(f"{worker.name} could not complete the request: {details}")
            self.registry.mark_unhealthy(worker, details)
            return Unavailable(f"{worker.name} is unavailable: {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(
                f"request {self.request.request_id} passed its deadline of {self.timeout_s:.3g} s at {worker.name}")
        if code == grpc.StatusCode.CANCELLED:
            # Not ours (ours raise CancelledError here): the worker cancelled it, e.g. while shutting down.
            return Unavailable(f"{worker.name} cancelled the request: {details}")
        return DownstreamError(f"{worker.name}: {details}", code)

    def _response(self, msg: decode_pb2.DecodeResponse, last: bool) -> gateway_pb2.GenerateResponse:
        self.completion_tokens += len(msg.token_ids)
        out = gateway_pb2.GenerateResponse(request_id=self.request.request_id, token_ids=msg.token_ids,
                                           text=msg.text, logprobs=msg.logprobs)
        if self._prompt_logprobs_due:
            self._prompt_logprobs_due = False
            out.prompt_logprobs.extend(msg.prompt_logprobs or (
                self.prefill_response.prompt_logprobs if self.prefill_response is not None else ()))
        if not last:
            return out
        out.finish_reason = msg.finish_reason
        which = msg.WhichOneof("stop_reason")
        if which is not None:
            setattr(out, which, getattr(msg, which))
        cached = msg.num_cached_tokens
        if self.prefill_response is not None:
            cached = max(cached, self.prefill_response.num_cached_tokens)
        out.usage.CopyFrom(gateway_pb2.Usage(
            prompt_tokens=msg.num_prompt_tokens or len(self.request.prompt_token_ids),
            completion_tokens=self.completion_tokens, cached_prompt_tokens=cached))
        return out


async def _close_gracefully(call: Any) -> None:
    """Read a finished stream's status, so the worker sees a clean end rather than a cancellation.

    Bounded: the client already has its last message, and a worker slow to close must not hold it.
    """
    try:
        await asyncio.wait_for(call.read(), STREAM_CLOSE_GRACE_S)
    except (asyncio.TimeoutError, grpc.aio.AioRpcError):
        pass


def _settle(future: asyncio.Future[Any]) -> None:
    """Cancel a pending future; mark a failed one's error as seen (it was reported another way)."""
    if not future.done():
        future.cancel()
    elif not future.cancelled():
        future.exception()
