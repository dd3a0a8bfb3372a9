"""The Decode gRPC servicer: reserve pages, rendezvous at kvtransfer, receive KV, stream tokens.

Telemetry: each request's log lines carry its request_id and trace_id; at its end its engine
timestamps become the `decode.*` spans and the latency histograms (`moemesh.telemetry.requests`); the
KV receive feeds the `moemesh_kv_transfer_*` families (side "receiver").
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from moemesh.engine.async_engine import AsyncEngine, Reserved
from moemesh.engine.engine import Resume
from moemesh.engine.request import RequestOutput
from moemesh.service.convert import finish_to_pb, logprobs_to_pb, prompt_logprobs_to_pb, sampling_from_pb
from moemesh.service.errors import DeadlineExceeded, InvalidArgument, PeerUnavailable
from moemesh.service.version import PROTOCOL_VERSION
from moemesh.telemetry import metrics
from moemesh.telemetry.logs import request_log_context
from moemesh.telemetry.requests import RequestTelemetry
from moemesh.transfer.base import KvReceiver, TransferError
from moemesh.transfer.planes import plane_to_proto
from moemesh.v1 import decode_pb2, decode_pb2_grpc, kvtransfer_pb2, kvtransfer_pb2_grpc
from moemesh.worker.kvtransfer_client import report_room_failed
from moemesh.worker.runtime import Worker, WorkerServicer

log = logging.getLogger(__name__)



class DecodeServicer(WorkerServicer, decode_pb2_grpc.DecodeServicer):
    """Exists (and answers UNAVAILABLE) from the moment the port is bound; `bind` makes it ready."""

    def __init__(self, make_receiver: Callable[[], KvReceiver], lease_ms: int = 60_000) -> None:
        self.make_receiver = make_receiver
        self.lease_ms = lease_ms
        self.receiver: KvReceiver | None = None

    async def bind(self, worker: Worker, kvtransfer: kvtransfer_pb2_grpc.KvTransferStub) -> None:
        self.receiver = self.make_receiver()
        await self.receiver.start()
        self.engine: AsyncEngine = worker.engine
        self.layout = worker.layout
        self.kv = kvtransfer
        self.worker = worker

    async def close(self) -> None:
        if self.receiver is not None:
            await self.receiver.close()

    async def Generate(self, request: decode_pb2.DecodeRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[decode_pb2.DecodeResponse]:
        self.ready()
        params = sampling_from_pb(request.sampling)
        rid = request.request_id or uuid.uuid4().hex
        prompt = list(request.prompt_token_ids)
        with request_log_context(rid, room_id=request.room_id or None):
            telemetry = RequestTelemetry("decode", rid, len(prompt))
            error: BaseException | None = None
            try:
                async for response in self._generate(request, rid, prompt, params, context, telemetry):
                    yield response
            except BaseException as e:
                error = e
                raise
            finally:
                telemetry.finish(error)
                log.debug("request ended: %s, %d tokens", telemetry.outcome or "ok", telemetry.num_output_tokens)

    async def _generate(self, request: decode_pb2.DecodeRequest, rid: str, prompt: list[int], params: Any,
                        context: grpc.aio.ServicerContext, telemetry: RequestTelemetry
                        ) -> AsyncIterator[decode_pb2.DecodeResponse]:
        resume = Resume(list(request.resume_token_ids), request.resume_text_chars)
        if not request.room_id:
            async for out in self.engine.generate(prompt, params, rid, resume):
                telemetry.on_output(out)
                yield _response(out)
            return
        events = self.engine.reserve(prompt, params, rid, resume)
        try:
            async for item in events:
                if isinstance(item, Reserved):
                    telemetry.on_reserved(item.timing)
                    # A migrated request receives the KV of its earlier outputs too.
                    await self._receive(request.room_id, rid, len(prompt) + len(resume.token_ids), context)
                else:
                    telemetry.on_output(item)
                    yield _response(item)
        finally:
            await events.aclose()  # aborts the request in the engine unless it finished

    async def _receive(self, room: str, rid: str, num_tokens: int, context: grpc.aio.ServicerContext) -> None:
        """Register as the room's receiver, wait for every chunk, report, and start decoding."""
        remaining = context.time_remaining()
        timeout_s = min(remaining, self.lease_ms / 1000) if remaining is not None else self.lease_ms / 1000
        ok = False
        plane = self.receiver.plane
        t_start = time.perf_counter()
        try:
            await self.kv.RegisterReceiver(kvtransfer_pb2.RegisterReceiverRequest(
                protocol_version=PROTOCOL_VERSION, room_id=room, request_id=rid, layout=self.layout,
                data_plane=plane_to_proto(plane), data_plane_name=plane, data_plane_address=self.receiver.address,
                num_tokens=num_tokens, lease_ms=int(timeout_s * 1000)), timeout=10)
            t0 = time.perf_counter()
            recv = asyncio.ensure_future(self.receiver.receive(
                room, num_tokens, lambda start, rows: self.engine.write_kv(rid, start, rows), timeout_s))
            watch = asyncio.ensure_future(self._until_failed(room))
            done, _ = await asyncio.wait({recv, watch}, return_when=asyncio.FIRST_COMPLETED)
            if recv not in done:
                await self.receiver.cancel(room)
                recv.cancel()
                raise PeerUnavailable(f"KV transfer for room {room} failed: {watch.result()}")
            watch.cancel()
            first, nbytes = recv.result()
            metrics.KV_TRANSFER_BYTES.labels("receiver", plane).inc(nbytes)
            metrics.KV_TRANSFER_LATENCY.labels("receiver", plane).observe(time.perf_counter() - t_start)
            log.debug("room %s: %d bytes in %.1f ms", room, nbytes, (time.perf_counter() - t0) * 1e3)
            top = list(first.top_logprobs) if first.top_logprobs is not None else None
            # Decoding starts before kvtransfer hears of it: its round trip (on a core the gateway and the
            # prefill worker share) is not in the first decode step's way. A failed report still fails the
            # request, whose pages the stream's close then frees.
            await self.engine.commit(rid, first.token_id, first.logprob, top)
            await self.kv.ReportTransfer(kvtransfer_pb2.ReportTransferRequest(
                room_id=room, state=kvtransfer_pb2.ROOM_STATE_SUCCESS, bytes=nbytes), timeout=10)
            ok = True
        except TransferError as e:
            if "timed out" in str(e) or "timeout" in str(e):
                raise DeadlineExceeded(f"KV for room {room} did not arrive in time: {e}") from None
            raise PeerUnavailable(f"KV transfer for room {room} failed: {e}") from None
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:  # the request's room, not kvtransfer, is at fault
                raise InvalidArgument(f"kvtransfer refused room {room[:256]}: {e.details()}") from None
            raise PeerUnavailable(f"kvtransfer is unreachable or refused room {room[:256]}: {e.details()}") from None
        finally:
            if not ok:
                metrics.KV_TRANSFER_FAILURES.labels("receiver", plane).inc()
                await self.receiver.cancel(room)
                await report_room_failed(self.kv, room, "the decode worker gave up on the room")

    async def _until_failed(self, room: str) -> str:
        """Return the room's error once kvtransfer reports it FAILED (the prefill side gave up)."""
        async for status in self.kv.WatchRoom(kvtransfer_pb2.WatchRoomRequest(room_id=room)):
            if status.state == kvtransfer_pb2.ROOM_STATE_FAILED:
                return status.error or "the room failed"
        await asyncio.Event().wait()  # the room succeeded: only the receive can finish now
        return ""




def _response(out: RequestOutput) -> decode_pb2.DecodeResponse:
    resp = decode_pb2.DecodeResponse(
        token_ids=out.new_token_ids, text=out.new_text,
        logprobs=logprobs_to_pb(out.new_logprobs, out.new_top_logprobs),
        num_prompt_tokens=out.num_prompt_tokens, num_cached_tokens=out.num_cached_tokens,
        prompt_logprobs=prompt_logprobs_to_pb(out.prompt_logprobs))
    if out.finished:
        resp.finish_reason = finish_to_pb(out.finish_reason)
        if isinstance(out.stop_reason, str):
            resp.stop_string = out.stop_reason
        elif isinstance(out.stop_reason, int):
            resp.stop_token_id = out.stop_reason
    return resp
