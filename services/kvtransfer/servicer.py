"""The KvTransfer gRPC servicer: protobuf in and out, the rooms and the relay do the work.

Refusals from rooms/relay (`KvTransferError`) become `moemesh.service.errors` exceptions here, which
the server's interceptor turns into status codes.

Telemetry: the sender's wait for its receiver is a `kvtransfer.rendezvous` span; a room's transfer,
from the sender's resolve to the room's end, a `kvtransfer.transfer` span in the sender's trace, and
the `moemesh_kv_transfer_*` families (side "room"; the relay's own bytes as side "relay").
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry import context as otel_context

from moemesh.service import errors
from moemesh.service.version import check_protocol_version
from moemesh.services.kvtransfer.errors import KvTransferError, Reason
from moemesh.services.kvtransfer.limits import check_id, clip
from moemesh.services.kvtransfer.relay import Relay
from moemesh.services.kvtransfer.rooms import Receiver, RoomRegistry, RoomState, RoomStatus, Side
from moemesh.telemetry import metrics
from moemesh.telemetry.tracing import record_span, tracer
from moemesh.transfer.layout import KvLayout
from moemesh.transfer.planes import PLANES, plane_from_proto, plane_to_proto
from moemesh.v1 import common_pb2, kvtransfer_pb2, kvtransfer_pb2_grpc

# One status code per refusal reason.
STATUS_OF: dict[Reason, type[errors.ServiceError]] = {
    Reason.INVALID: errors.InvalidArgument,
    Reason.NOT_FOUND: errors.NotFound,
    Reason.CONFLICT: errors.FailedPrecondition,
    Reason.INCOMPATIBLE: errors.FailedPrecondition,
    Reason.TIMED_OUT: errors.DeadlineExceeded,
    Reason.ABORTED: errors.Aborted,
    Reason.EXHAUSTED: errors.ResourceExhausted,
    Reason.SHUTTING_DOWN: errors.Unavailable,
}

# Optional call metadata naming the caller's side ("sender" or "receiver") on ReportTransfer, so the
# "only the receiver reports SUCCESS" rule can be enforced; the request itself does not say.
SIDE_METADATA_KEY = "moemesh-kv-side"


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except KvTransferError as e:
        raise STATUS_OF[e.reason](str(e)) from None


def _enum_name(enum: Any, value: int) -> str:
    return enum.Name(value) if value in enum.values() else str(value)


# What a layout may name (UNSPECIFIED is a field left unset, not a choice).
_KV_DTYPES = tuple(v for v in common_pb2.KvDtype.values() if v != common_pb2.KV_DTYPE_UNSPECIFIED)


def _require(room_id: str) -> str:
    with _mapped():
        return check_id("room_id", room_id)


def _layout(request: kvtransfer_pb2.RegisterReceiverRequest | kvtransfer_pb2.ResolveReceiverRequest) -> KvLayout:
    """The request's layout, refused (INVALID_ARGUMENT) when missing or not a layout any worker has."""
    if not request.HasField("layout"):
        raise errors.InvalidArgument("layout is required")
    msg = request.layout
    with _mapped():
        check_id("layout.model_fingerprint", msg.model_fingerprint, required=False)
    if msg.dtype not in _KV_DTYPES:
        names = ", ".join(map(common_pb2.KvDtype.Name, _KV_DTYPES))
        raise errors.InvalidArgument(f"layout.dtype must be one of {names}, "
                                     f"not {_enum_name(common_pb2.KvDtype, msg.dtype)}")
    for name in ("num_layers", "page_size_tokens", "kv_lora_rank"):
        if getattr(msg, name) < 1:
            raise errors.InvalidArgument(f"layout.{name} must be at least 1")
    return KvLayout.from_proto(msg)


def _side_of(context: grpc.aio.ServicerContext) -> Side | None:
    for key, value in context.invocation_metadata() or ():
        if key == SIDE_METADATA_KEY:
            try:
                return Side(value)
            except ValueError:
                raise errors.InvalidArgument(
                    f"{SIDE_METADATA_KEY} metadata is 'sender' or 'receiver', not {value!r}") from None
    return None


def _status_to_proto(s: RoomStatus) -> kvtransfer_pb2.RoomStatus:
    return kvtransfer_pb2.RoomStatus(room_id=s.room_id, state=int(s.state), error=s.error)


def _plane(request: kvtransfer_pb2.RegisterReceiverRequest) -> str:
    """The receiver's plane by name: data_plane_name, else the enum (receivers that predate the name).

    Refused (INVALID_ARGUMENT) when neither names a registered plane or the two disagree: the sender would be
    told to use a plane it cannot know, so the cause is reported here.
    """
    with _mapped():
        check_id("data_plane_name", request.data_plane_name, required=False)
    try:
        return plane_from_proto(request.data_plane, request.data_plane_name)
    except ValueError as e:
        if request.data_plane_name:
            raise errors.InvalidArgument(f"data_plane_name: {e}") from None
    listed = [kvtransfer_pb2.DataPlane.Name(v) for v in map(plane_to_proto, PLANES) if v]
    given = _enum_name(kvtransfer_pb2.DataPlane, request.data_plane)
    raise errors.InvalidArgument(
        f"data_plane must be one of {', '.join(listed)}, not {given} "
        f"(or data_plane_name one of {', '.join(PLANES)})")


@dataclass
class _RoomTelemetry:
    """What a room's end needs to report its transfer: set by the calls that touch the room."""

    plane: str = "unknown"
    transfer_start_ns: int = 0  # monotonic: the sender resolved the receiver
    sender_context: otel_context.Context | None = field(default=None, repr=False)
    bytes: int = 0


class KvTransferServicer(kvtransfer_pb2_grpc.KvTransferServicer):
    """Maps the KvTransfer RPCs onto a `RoomRegistry` and a `Relay`."""

    def __init__(self, rooms: RoomRegistry, relay: Relay) -> None:
        self.rooms = rooms
        self.relay = relay
        self._telemetry: dict[str, _RoomTelemetry] = {}
        rooms.on_end(self._room_ended)

    def _room_ended(self, status: RoomStatus, failure: KvTransferError | None) -> None:
        info = self._telemetry.pop(status.room_id, None) or _RoomTelemetry()
        ok = status.state is RoomState.SUCCESS
        if not ok:
            metrics.KV_TRANSFER_FAILURES.labels("room", info.plane).inc()
        if not info.transfer_start_ns:
            return  # never paired: no transfer happened
        end = time.monotonic_ns()
        if ok:
            metrics.KV_TRANSFER_BYTES.labels("room", info.plane).inc(info.bytes)
            metrics.KV_TRANSFER_LATENCY.labels("room", info.plane).observe((end - info.transfer_start_ns) / 1e9)
        record_span("kvtransfer.transfer", info.transfer_start_ns, end, info.sender_context,
                    {"moemesh.room_id": status.room_id, "moemesh.kv_plane": info.plane, "moemesh.kv_bytes": info.bytes},
                    None if ok else (status.error or "the room failed"))

    def _room(self, room_id: str) -> _RoomTelemetry:
        info = self._telemetry.get(room_id)
        if info is None:
            info = self._telemetry[room_id] = _RoomTelemetry()
        return info

    async def RegisterReceiver(self, request: kvtransfer_pb2.RegisterReceiverRequest,
                               context: grpc.aio.ServicerContext) -> kvtransfer_pb2.RegisterReceiverResponse:
        check_protocol_version(request.protocol_version, "the KV receiver")
        room_id = _require(request.room_id)
        layout = _layout(request)
        plane = _plane(request)
        with _mapped():
            check_id("data_plane_address", request.data_plane_address, required=False)
            check_id("request_id", request.request_id, required=False)
        receiver = Receiver(layout=layout, data_plane=plane, address=request.data_plane_address,
                            num_tokens=request.num_tokens, request_id=request.request_id)
        with _mapped():
            state = self.rooms.register_receiver(room_id, receiver, lease_ms=request.lease_ms)
        if not state.terminal:
            self._room(room_id).plane = plane
        return kvtransfer_pb2.RegisterReceiverResponse(state=int(state))

    async def ResolveReceiver(self, request: kvtransfer_pb2.ResolveReceiverRequest,
                              context: grpc.aio.ServicerContext) -> kvtransfer_pb2.ResolveReceiverResponse:
        check_protocol_version(request.protocol_version, "the KV sender")
        room_id = _require(request.room_id)
        layout = _layout(request)
        sender_context = otel_context.get_current()
        with _mapped(), tracer.start_as_current_span("kvtransfer.rendezvous",
                                                     attributes={"moemesh.room_id": room_id}):
            state, receiver = await self.rooms.resolve_receiver(
                room_id, layout, wait_ms=request.wait_ms, lease_ms=request.lease_ms)
        if not state.terminal:
            info = self._room(room_id)
            info.plane = receiver.data_plane
            info.transfer_start_ns = info.transfer_start_ns or time.monotonic_ns()
            info.sender_context = sender_context
        return kvtransfer_pb2.ResolveReceiverResponse(
            state=int(state), data_plane=plane_to_proto(receiver.data_plane), data_plane_address=receiver.address,
            num_tokens=receiver.num_tokens, data_plane_name=receiver.data_plane)

    async def ReportTransfer(self, request: kvtransfer_pb2.ReportTransferRequest,
                             context: grpc.aio.ServicerContext) -> kvtransfer_pb2.ReportTransferResponse:
        room_id = _require(request.room_id)
        if request.state not in (RoomState.SUCCESS, RoomState.FAILED):
            name = kvtransfer_pb2.RoomState.Name(request.state) if request.state in kvtransfer_pb2.RoomState.values() \
                else str(request.state)
            raise errors.InvalidArgument(f"a report's state is ROOM_STATE_SUCCESS or ROOM_STATE_FAILED, not {name}")
        side = _side_of(context)
        info = self._telemetry.get(room_id)
        if info is not None and request.state == RoomState.SUCCESS:
            info.bytes = request.bytes  # read when the report ends the room
        with _mapped():
            # A failing side's reason is kept and shown to every watcher: cut, not refused (the report matters).
            state = self.rooms.report(room_id, RoomState(request.state), error=clip(request.error),
                                      bytes_moved=request.bytes, side=side)
        return kvtransfer_pb2.ReportTransferResponse(state=int(state))

    async def WatchRoom(self, request: kvtransfer_pb2.WatchRoomRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[kvtransfer_pb2.RoomStatus]:
        room_id = _require(request.room_id)
        with _mapped():
            async for status in self.rooms.watch(room_id):
                yield _status_to_proto(status)

    async def PushChunks(self, request_iterator: AsyncIterator[kvtransfer_pb2.KvChunk],
                         context: grpc.aio.ServicerContext) -> kvtransfer_pb2.PushChunksResponse:
        with _mapped():
            num_chunks, num_bytes = await self.relay.push(request_iterator)
        metrics.KV_TRANSFER_BYTES.labels("relay", "relay").inc(num_bytes)
        return kvtransfer_pb2.PushChunksResponse(num_chunks=num_chunks, bytes=num_bytes)

    async def PullChunks(self, request: kvtransfer_pb2.PullChunksRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[kvtransfer_pb2.KvChunk]:
        room_id = _require(request.room_id)
        with _mapped():
            async for chunk in self.relay.pull(room_id):
                yield chunk
