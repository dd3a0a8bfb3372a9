"""The relay data plane: KV goes through the kvtransfer service, for networks where the prefill worker
cannot reach the decode worker. The sender streams a room's chunks with `PushChunks` (client streaming);
the receiver reads them with `PullChunks(room_id)` (server streaming). Both talk to one kvtransfer
target ("host:port"). The receiver's address is "" (nothing to dial: the relay holds the chunks).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc

from moemesh.service.channel import CHANNEL_OPTIONS, mesh_channel
from moemesh.transfer.assembler import IncomingTransfers
from moemesh.transfer.base import FirstToken, KvReceiver, KvSender, RowBlock, RowWriter, TransferError
from moemesh.transfer.chunk import DEFAULT_CHUNK_BYTES, decode_chunk, iter_chunks
from moemesh.transfer.faults import FaultInjector, KvFaults
from moemesh.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc

# How long one chunk may wait for the relay to take it before the send fails.
DEFAULT_WRITE_TIMEOUT_S = 30.0


class _Relay:
    """One grpc.aio channel to kvtransfer, opened on first use so it binds to the running event loop."""

    def __init__(self, target: str) -> None:
        if not target:
            raise ValueError("the relay data plane needs the kvtransfer target (host:port)")
        self.target = target
        self._channel: grpc.aio.Channel | None = None
        self._stub: kvtransfer_pb2_grpc.KvTransferStub | None = None

    def stub(self) -> kvtransfer_pb2_grpc.KvTransferStub:
        if self._stub is None:
            # Traced: the relay's calls join the trace of the request whose KV they carry.
            self._channel = mesh_channel(self.target, options=CHANNEL_OPTIONS)
            self._stub = kvtransfer_pb2_grpc.KvTransferStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None


async def _rpc_error(call: Any, e: BaseException) -> str:
    """Why a call failed, from the exception or, when the call was already over, from its status."""
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    try:
        return f"{(await call.code()).name}: {await call.details()}"
    except Exception:  # the status itself is unavailable; the original error says enough
        return f"{type(e).__name__}: {e}"


# grpc's Python client reports this itself when a write races the server ending the call (grpc/grpc#36066):
# the relay's own status (why it ended the push) is lost, so the sender asks kvtransfer for the room's.
_LOST_STATUS = "Internal error from Core"


async def _room_failure(stub: kvtransfer_pb2_grpc.KvTransferStub, room_id: str) -> str | None:
    """The room's failure as kvtransfer tells it; None when it did not fail or cannot be asked."""
    try:
        call = stub.WatchRoom(kvtransfer_pb2.WatchRoomRequest(room_id=room_id), timeout=2)
        status = await call.read()
        call.cancel()
    except Exception:  # best effort: the caller still has grpc's own error to report
        return None
    if status is grpc.aio.EOF or status.state != kvtransfer_pb2.ROOM_STATE_FAILED:
        return None
    return status.error or "the room failed"


class RelaySender(KvSender):
    """Pushes rooms to the relay at `target`, in chunks of at most max_chunk_bytes (under gRPC's limit).

    `send`'s address argument is ignored: a relay receiver registers "" and the relay is `target`.
    """

    plane = "relay"

    def __init__(self, target: str, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 write_timeout_s: float = DEFAULT_WRITE_TIMEOUT_S, faults: KvFaults | None = None) -> None:
        self._relay = _Relay(target)
        self.max_chunk_bytes = max_chunk_bytes
        self.write_timeout_s = write_timeout_s
        self.faults = FaultInjector.for_sender(faults)  # MOEMESH_FAULT_KV; None when off

    async def send(self, room_id: str, address: str, blocks: AsyncIterator[RowBlock],
                   first: Awaitable[FirstToken]) -> int:
        call = self._relay.stub().PushChunks()
        sent = chunks = 0
        try:
            chunks_in = iter_chunks(room_id, blocks, first, self.max_chunk_bytes)
            async with contextlib.aclosing(self.faults.wrap(chunks_in) if self.faults else chunks_in) as stream:
                async for chunk in stream:
                    await asyncio.wait_for(call.write(chunk.to_message()), self.write_timeout_s)
                    sent += chunk.nbytes
                    chunks += 1
            await asyncio.wait_for(call.done_writing(), self.write_timeout_s)
            reply: kvtransfer_pb2.PushChunksResponse = await asyncio.wait_for(call, self.write_timeout_s)
        except asyncio.TimeoutError:
            call.cancel()
            raise TransferError(f"room {room_id!r}: the relay at {self._relay.target} took no chunk for "
                                f"{self.write_timeout_s:g} s") from None
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
            why = await _rpc_error(call, e)
            if why.endswith(_LOST_STATUS):
                failure = await _room_failure(self._relay.stub(), room_id)
                why = f"ABORTED: the relay ended the push: {failure}" if failure else why
            raise TransferError(f"room {room_id!r}: relay push to {self._relay.target} failed: {why}") from e
        except BaseException:
            call.cancel()
            raise
        if reply.num_chunks != chunks or reply.bytes != sent:
            raise TransferError(f"room {room_id!r}: the relay took {reply.num_chunks} chunks / {reply.bytes} bytes "
                                f"of {chunks} / {sent}")
        return sent

    async def close(self) -> None:
        await self._relay.close()


class RelayReceiver(KvReceiver):
    """Pulls each room from the relay at `target` while `receive` runs. `limits` tunes its IncomingTransfers."""

    plane = "relay"

    def __init__(self, target: str, **limits: Any) -> None:
        self._relay = _Relay(target)
        self._incoming = IncomingTransfers(**limits)
        self._pulls: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> None:
        self._relay.stub()

    @property
    def address(self) -> str:
        return ""

    async def receive(self, room_id: str, num_tokens: int, write: RowWriter,
                      timeout_s: float) -> tuple[FirstToken, int]:
        # The gRPC deadline trails the receive's own, so a timeout reads as the room's, not the stream's.
        call = self._relay.stub().PullChunks(kvtransfer_pb2.PullChunksRequest(room_id=room_id), timeout=timeout_s + 1)
        pull = asyncio.ensure_future(self._pull(room_id, call))
        self._pulls[room_id] = pull
        try:
            return await self._incoming.receive(room_id, num_tokens, write, timeout_s)
        finally:
            self._pulls.pop(room_id, None)
            call.cancel()
            pull.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pull

    async def _pull(self, room_id: str, call: Any) -> None:
        try:
            async for msg in call:
                if msg.room_id != room_id:
                    self._incoming.fail(room_id, TransferError(f"room {room_id!r}: the relay sent a chunk of "
                                                            f"room {msg.room_id!r}"))
                    return
                try:
                    chunk = decode_chunk(msg)
                except TransferError as e:
                    self._incoming.fail(room_id, e)
                    return
                self._incoming.deliver(chunk)
                if chunk.last:
                    return
            self._incoming.fail(room_id,
                                TransferError(f"room {room_id!r}: the relay stream ended before the last chunk"))
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self._incoming.fail(room_id, TransferError(f"room {room_id!r}: relay pull from {self._relay.target} "
                                                        f"failed: {e.code().name}: {e.details()}"))

    async def cancel(self, room_id: str) -> None:
        self._incoming.cancel(room_id)

    async def close(self) -> None:
        self._incoming.close()
        for pull in list(self._pulls.values()):
            pull.cancel()
        await asyncio.gather(*self._pulls.values(), return_exceptions=True)
        await self._relay.close()
