"""The relay data plane: a room's KV chunks from one PushChunks stream to one PullChunks stream.

Pure asyncio, no gRPC. Chunks are forwarded as they are (never decoded or copied); the relay reads
only `room_id`, `len(data)` and `last`. Each room gets a bounded buffer: a push waits while it is
full (backpressure), a pull waits while it is empty, and either may start first. A chunk too big for
a room's buffer, or one that would take the relay past its overall byte cap, is refused (EXHAUSTED).

The relay follows its rooms: a room that fails (lease, a report, a broken stream) ends both streams
with the room's failure and frees its buffer; a relay error fails the room, so the other side and
every watcher learn of it. Every wait is bounded by the room's lease.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterable, AsyncIterator
from typing import Protocol

from moemesh.services.kvtransfer.errors import KvTransferError, Reason
from moemesh.services.kvtransfer.limits import check_id
from moemesh.services.kvtransfer.rooms import RoomRegistry, RoomState, RoomStatus
from moemesh.services.kvtransfer.waits import Notifier

log = logging.getLogger(__name__)

# Waiters wake this much after a lease's deadline, so the registry surely sees it as expired.
_LEASE_SLACK_S = 0.005

_PUSHABLE = (RoomState.TRANSFERRING,)
_PULLABLE = (RoomState.WAITING_FOR_INPUT, RoomState.TRANSFERRING)


class Chunk(Protocol):
    """What the relay reads of a chunk (the proto's KvChunk has these and more)."""

    room_id: str
    data: bytes
    last: bool


class _Channel:
    """One room's buffer between its pusher and its puller."""

    def __init__(self, room_id: str) -> None:
        self.room_id = room_id
        self.chunks: collections.deque[Chunk] = collections.deque()
        self.buffered_bytes = 0
        self.pushing = False
        self.pulling = False
        self.last_pushed = False
        self.last_pulled = False
        # Set when the room ends: what any stream still open on it raises.
        self.error: KvTransferError | None = None
        self.succeeded = False
        self.changed = Notifier()

    def raise_if_closed(self) -> None:
        if self.error is not None:
            raise KvTransferError(self.error.reason, str(self.error))


class Relay:
    """Per-room chunk buffers for the rooms of `rooms`.

    `queue_chunks` and `room_max_bytes` bound one room's buffer (a push waits beyond either);
    `total_max_bytes` bounds all rooms' buffers together (a push is refused beyond it).
    """

    def __init__(self, rooms: RoomRegistry, *, queue_chunks: int = 16, room_max_bytes: int = 256 * 2**20,
                 total_max_bytes: int = 1024 * 2**20) -> None:
        self.rooms = rooms
        self.queue_chunks = queue_chunks
        self.room_max_bytes = room_max_bytes
        self.total_max_bytes = total_max_bytes
        self.buffered_bytes = 0
        self._channels: dict[str, _Channel] = {}
        rooms.on_end(self._room_ended)

    async def push(self, chunks: AsyncIterable[Chunk]) -> tuple[int, int]:
        """Buffer one room's chunks as they come; returns (chunks, data bytes) taken.

        The room is the first chunk's and must be TRANSFERRING (its sender resolved the receiver).
        A stream may end before the last chunk and a later one continue; two at once are refused.
        """
        it = aiter(chunks)
        try:
            # Before the first chunk no room (and no lease) is known: the longest lease bounds the wait.
            first = await asyncio.wait_for(anext(it), self.rooms.max_lease_ms / 1000)
        except StopAsyncIteration:
            return 0, 0
        except asyncio.TimeoutError:
            raise KvTransferError(Reason.TIMED_OUT, "a PushChunks stream sent no chunk in time") from None
        room_id = first.room_id
        if not room_id:
            raise KvTransferError(Reason.INVALID, "a KvChunk without room_id")
        check_id("room_id", room_id)
        self.rooms.check_state(room_id, _PUSHABLE, "push chunks to")
        ch = self._channel(room_id)
        if ch.pushing:
            raise KvTransferError(Reason.CONFLICT, f"room {room_id!r} already has a PushChunks stream open")
        if ch.last_pushed:
            raise KvTransferError(Reason.CONFLICT, f"room {room_id!r} already got its last chunk")
        ch.pushing = True
        num_chunks = num_bytes = 0
        chunk: Chunk | None = first
        try:
            while chunk is not None:
                if chunk.room_id != room_id:
                    self._fail(ch, Reason.INVALID,
                               f"a chunk for room {chunk.room_id!r} in the PushChunks stream of this room")
                if ch.last_pushed:
                    self._fail(ch, Reason.INVALID, "a chunk after the last one")
                await self._enqueue(ch, chunk)
                num_chunks += 1
                num_bytes += len(chunk.data)
                chunk = await self._next(ch, it)
        except asyncio.CancelledError:
            if not ch.last_pushed:
                self.rooms.fail(room_id, KvTransferError(
                    Reason.ABORTED, f"room {room_id!r}: the sender's relay stream broke off before the last chunk"))
            raise
        finally:
            ch.pushing = False
        return num_chunks, num_bytes

    async def pull(self, room_id: str) -> AsyncIterator[Chunk]:
        """The room's chunks in push order as they arrive, ending after the one with `last` set.

        The room must be WAITING_FOR_INPUT or TRANSFERRING (its receiver registered); the pull may
        start before the push. Raises the room's failure when it fails meanwhile.
        """
        self.rooms.check_state(room_id, _PULLABLE, "pull chunks of")
        ch = self._channel(room_id)
        if ch.pulling:
            raise KvTransferError(Reason.CONFLICT, f"room {room_id!r} already has a PullChunks stream open")
        if ch.last_pulled:
            raise KvTransferError(Reason.CONFLICT, f"room {room_id!r} already delivered its last chunk")
        ch.pulling = True
        try:
            while True:
                ch.raise_if_closed()
                if not ch.chunks:
                    await self._wait(ch)
                    continue
                chunk = ch.chunks.popleft()
                self._release(ch, len(chunk.data))
                ch.last_pulled = chunk.last
                ch.changed.notify()  # room in the buffer: a waiting push may go on
                yield chunk
                if chunk.last:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            if not ch.last_pulled:
                self.rooms.fail(room_id, KvTransferError(
                    Reason.ABORTED, f"room {room_id!r}: the receiver's relay stream broke off before the last chunk"))
            raise
        finally:
            ch.pulling = False

    # -- internals -------------------------------------------------------------------------------

    def _channel(self, room_id: str) -> _Channel:
        ch = self._channels.get(room_id)
        if ch is None:
            ch = self._channels[room_id] = _Channel(room_id)
        return ch

    async def _enqueue(self, ch: _Channel, chunk: Chunk) -> None:
        size = len(chunk.data)
        if size > self.room_max_bytes:
            self._fail(ch, Reason.EXHAUSTED,
                       f"a chunk of {size} bytes exceeds the relay's per-room buffer of {self.room_max_bytes} bytes")
        while True:
            ch.raise_if_closed()
            if len(ch.chunks) < self.queue_chunks and ch.buffered_bytes + size <= self.room_max_bytes:
                break
            await self._wait(ch)  # backpressure: until the puller takes a chunk
        if self.buffered_bytes + size > self.total_max_bytes:
            self._fail(ch, Reason.EXHAUSTED,
                       f"the relay buffers {self.buffered_bytes} bytes; {size} more exceed its limit of "
                       f"{self.total_max_bytes} bytes")
        ch.chunks.append(chunk)
        ch.buffered_bytes += size
        self.buffered_bytes += size
        if chunk.last:
            ch.last_pushed = True
        ch.changed.notify()

    async def _next(self, ch: _Channel, it: AsyncIterator[Chunk]) -> Chunk | None:
        """The stream's next chunk (None at its end), given up as soon as the room ends."""
        read = asyncio.ensure_future(anext(it))
        # Given up reads may still fail later (the stream is torn down): nobody needs that error.
        read.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            while not read.done():
                if ch.succeeded and ch.last_pushed:
                    # Every chunk went through and the receiver said so before this stream ended.
                    return None
                ch.raise_if_closed()
                await ch.changed.wait_or(read, self.rooms.lease_left_s(ch.room_id) + _LEASE_SLACK_S)
                self.rooms.expire_if_due(ch.room_id)
            # A chunk that arrived is judged by _enqueue; the stream's end is fine even after the room ended.
            return read.result()
        except StopAsyncIteration:
            return None
        finally:
            if not read.done():
                read.cancel()

    async def _wait(self, ch: _Channel) -> None:
        await ch.changed.wait(self.rooms.lease_left_s(ch.room_id) + _LEASE_SLACK_S)
        self.rooms.expire_if_due(ch.room_id)
        if ch.room_id not in self.rooms and ch.error is None:
            # Cannot happen (rooms end before they are forgotten); guards against spinning if it does.
            ch.error = KvTransferError(Reason.NOT_FOUND, f"room {ch.room_id!r} is gone")

    def _release(self, ch: _Channel, size: int) -> None:
        ch.buffered_bytes -= size
        self.buffered_bytes -= size

    def _fail(self, ch: _Channel, reason: Reason, message: str) -> None:
        """Fail the room (the other side sees ABORTED) and raise `reason` to this side."""
        message = f"room {ch.room_id!r}: relay: {message}"
        self.rooms.fail(ch.room_id, KvTransferError(Reason.ABORTED, message))
        raise KvTransferError(reason, message)

    def _room_ended(self, status: RoomStatus, failure: KvTransferError | None) -> None:
        ch = self._channels.pop(status.room_id, None)
        if ch is None:
            return
        ch.succeeded = status.state is RoomState.SUCCESS
        ch.error = failure or KvTransferError(
            Reason.CONFLICT, f"room {status.room_id!r} already ended in {status.state.name}")
        self._release(ch, ch.buffered_bytes)
        ch.chunks.clear()
        ch.changed.notify()
