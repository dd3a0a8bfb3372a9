"""The Prefill gRPC servicer: compute a prompt while resolving its receiver, stream its KV as it is made.

Telemetry: each request's log lines carry its request_id and trace_id; its engine timestamps become
the `prefill.queue_wait` and `prefill.forward` spans and the latency histograms; the send is a
`prefill.kv_send` span and feeds the `moemesh_kv_transfer_*` families (side "sender").
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc

from moemesh.engine.async_engine import AsyncEngine, KvRows
from moemesh.engine.engine import Resume
from moemesh.service.convert import logprobs_to_pb, prompt_logprobs_to_pb, sampling_from_pb
from moemesh.service.errors import FailedPrecondition, InvalidArgument, PeerUnavailable
from moemesh.service.version import PROTOCOL_VERSION
from moemesh.telemetry import metrics
from moemesh.telemetry.logs import request_log_context
from moemesh.telemetry.requests import RequestTelemetry
from moemesh.telemetry.tracing import tracer
from moemesh.transfer.base import FirstToken, KvSender, RowBlock, TransferError
from moemesh.transfer.planes import plane_from_proto
from moemesh.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from moemesh.worker.kvtransfer_client import report_room_failed
from moemesh.worker.runtime import Worker, WorkerServicer

log = logging.getLogger(__name__)



class PrefillServicer(WorkerServicer, prefill_pb2_grpc.PrefillServicer):
    """Exists (and answers UNAVAILABLE) from the moment the port is bound; `bind` makes it ready."""

    def __init__(self, make_sender: Callable[[str], KvSender], wait_ms: int = 30_000, lease_ms: int = 60_000) -> None:
        self.make_sender = make_sender
        self.wait_ms = wait_ms
        self.lease_ms = lease_ms
        self.senders: dict[str, KvSender] = {}

    async def bind(self, worker: Worker, kvtransfer: kvtransfer_pb2_grpc.KvTransferStub) -> None:
        self.engine: AsyncEngine = worker.engine
        self.layout = worker.layout
        self.kv = kvtransfer
        self.worker = worker

    def sender_for(self, plane: str) -> KvSender:
        # One sender per plane, made on first use: the receiver's registration decides the plane.
        if plane not in self.senders:
            self.senders[plane] = self.make_sender(plane)
        return self.senders[plane]

    async def close(self) -> None:
        for sender in self.senders.values():
            await sender.close()

    async def Prefill(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
                      ) -> prefill_pb2.PrefillResponse:
        self.ready()
        return await self._job(request, context, None)

    async def PrefillStream(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[prefill_pb2.PrefillEvent]:
        """Prefill's job, with its first token sent as soon as it is sampled where the decode worker's first
        output will repeat it exactly (the engine's `first_text`); cancelling the stream cancels the job."""
        self.ready()
        early: asyncio.Queue[prefill_pb2.FirstTokenEvent] = asyncio.Queue()
        job = asyncio.ensure_future(self._job(request, context, early.put_nowait))
        first = asyncio.ensure_future(early.get())
        try:
            await asyncio.wait({job, first}, return_when=asyncio.FIRST_COMPLETED)
            if first.done():
                yield prefill_pb2.PrefillEvent(first=first.result())
            yield prefill_pb2.PrefillEvent(done=await job)
        finally:
            first.cancel()
            if not job.done():
                job.cancel()
            await asyncio.gather(job, first, return_exceptions=True)

    async def _job(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext,
                   early: Callable[[prefill_pb2.FirstTokenEvent], None] | None) -> prefill_pb2.PrefillResponse:
        rid = request.request_id or uuid.uuid4().hex
        with request_log_context(rid, room_id=request.room_id or None):
            telemetry = RequestTelemetry("prefill", rid, len(request.prompt_token_ids))
            error: BaseException | None = None
            try:
                return await self._prefill(request, rid, context, telemetry, early)
            except BaseException as e:
                error = e
                raise
            finally:
                telemetry.finish(error)
                log.debug("prefill ended: %s", telemetry.outcome or "ok")

    async def _prefill(self, request: prefill_pb2.PrefillRequest, rid: str, context: grpc.aio.ServicerContext,
                       telemetry: RequestTelemetry, early: Callable[[prefill_pb2.FirstTokenEvent], None] | None
                       ) -> prefill_pb2.PrefillResponse:
        params = sampling_from_pb(request.sampling)
        room = request.room_id
        if not room:
            raise FailedPrecondition("a prefill needs the room_id of its decode worker")
        remaining = context.time_remaining()
        wait_ms = int(min(self.wait_ms, remaining * 1000)) if remaining is not None else self.wait_ms
        t0 = time.perf_counter_ns()
        times: dict[str, int] = {}
        blocks: asyncio.Queue[RowBlock | None] = asyncio.Queue()
        first: asyncio.Future[FirstToken] = asyncio.get_running_loop().create_future()
        cached = 0
        prompt_logprobs = None

        async def compute() -> None:
            nonlocal cached, prompt_logprobs
            resume = Resume(list(request.resume_token_ids), request.resume_text_chars)
            async for item in self.engine.prefill(list(request.prompt_token_ids), params, rid, resume):
                if isinstance(item, KvRows):
                    times.setdefault("first_rows", time.perf_counter_ns())
                    blocks.put_nowait(RowBlock(item.token_start, item.rows))
                else:
                    telemetry.on_output(item)
                    cached = item.num_cached_tokens
                    prompt_logprobs = item.prompt_logprobs
                    times["first_token"] = time.perf_counter_ns()
                    top = tuple(item.new_top_logprobs[0]) if item.new_top_logprobs else None
                    lp = item.new_logprobs[0] if item.new_logprobs else None
                    first.set_result(FirstToken(item.new_token_ids[0], lp, top))
                    if early is not None and item.first_text is not None:
                        early(prefill_pb2.FirstTokenEvent(
                            token_id=item.new_token_ids[0], text=item.first_text,
                            logprobs=logprobs_to_pb([lp], [top or ()])[0] if lp is not None else None))
            blocks.put_nowait(None)

        computing = asyncio.ensure_future(compute())
        ok = False
        nbytes = 0
        plane = ""
        try:
            # The receiver is resolved while the prompt computes: neither waits for the other.
            resolved = await self.kv.ResolveReceiver(kvtransfer_pb2.ResolveReceiverRequest(
                protocol_version=PROTOCOL_VERSION, room_id=room, layout=self.layout, wait_ms=wait_ms,
                lease_ms=self.lease_ms), timeout=wait_ms / 1000 + 5)
            plane = plane_from_proto(resolved.data_plane, resolved.data_plane_name)
            sender = self.sender_for(plane)

            async def stream() -> AsyncIterator[RowBlock]:
                while True:
                    if computing.done() and computing.exception() is not None:
                        raise computing.exception()
                    block = await blocks.get()
                    if block is None:
                        return
                    yield block

            t_send = time.perf_counter()
            with tracer.start_as_current_span("prefill.kv_send", attributes={
                    "moemesh.room_id": room, "moemesh.kv_plane": plane}) as span:
                nbytes = await sender.send(room, resolved.data_plane_address, stream(), first)
                span.set_attribute("moemesh.kv_bytes", nbytes)
            metrics.KV_TRANSFER_BYTES.labels("sender", plane).inc(nbytes)
            metrics.KV_TRANSFER_LATENCY.labels("sender", plane).observe(time.perf_counter() - t_send)
            await computing  # surfaces an engine error that ended the stream
            ok = True
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise FailedPrecondition(e.details()) from None
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:  # the request's room, not kvtransfer, is at fault
                raise InvalidArgument(f"kvtransfer refused room {room[:256]}: {e.details()}") from None
            raise PeerUnavailable(
                f"kvtransfer could not pair room {room[:256]}: {e.code().name}: {e.details()}") from None
        except TransferError as e:
            metrics.KV_TRANSFER_FAILURES.labels("sender", plane).inc()
            raise PeerUnavailable(f"sending KV for room {room} failed: {e}") from None
        finally:
            computing.cancel()
            await asyncio.gather(computing, return_exceptions=True)
            await self.engine.release(rid)
            if not ok:
                await report_room_failed(self.kv, room, "the prefill worker could not deliver the KV")
        done = time.perf_counter_ns()
        tok = first.result()
        return prefill_pb2.PrefillResponse(
            first_token_id=tok.token_id,
            first_logprobs=logprobs_to_pb([tok.logprob], [tok.top_logprobs or ()])[0] if tok.logprob is not None
            else None,
            num_cached_tokens=cached, queue_ns=times.get("first_rows", t0) - t0,
            forward_ns=times["first_token"] - times.get("first_rows", t0), transfer_ns=done - times["first_token"],
            kv_bytes=nbytes, prompt_logprobs=prompt_logprobs_to_pb(prompt_logprobs))


