"""The receive side every plane shares: per-room ordering checks, buffering, and the `receive` loop.

A plane's only job is to turn what arrives into `DecodedChunk`s and hand them to its receiver's
`IncomingTransfers.deliver` (or a room's failure to `IncomingTransfers.fail`): the transfers that receiver is
assembling, one per room (one request's KV handoff). It routes each chunk to its room's `RoomAssembler`,
which checks the chunk sequence as it arrives and buffers verified chunks until `receive` (running in
the caller's task) writes them out. Rooms whose chunks arrive before `receive` is called are held,
bounded in number, bytes and age. Rooms that ended (received, cancelled, failed) are remembered for a
while, so late or stray chunks for them are dropped instead of starting a new room.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

import numpy as np

from moemesh.transfer.base import FirstToken, KvReceiver, RowWriter, TransferError
from moemesh.transfer.chunk import DecodedChunk, decode_chunk
from moemesh.v1 import kvtransfer_pb2

log = logging.getLogger(__name__)

# Per room, verified bytes waiting for `receive` (arrived early, or the writer lags).
DEFAULT_MAX_ROOM_BUFFER_BYTES = 512 * 2**20
# Rooms with chunks but no `receive` yet; more is a sign receives are not being called at all.
DEFAULT_MAX_UNCLAIMED_ROOMS = 64
# How long chunks may wait for their `receive` before the room is dropped.
DEFAULT_UNCLAIMED_TTL_S = 120.0
# Ended rooms remembered so their late chunks are dropped.
DEFAULT_MAX_ENDED_ROOMS = 4096
# Rooms one connection tracks as started-but-unfinished before it prunes ended ones.
_MAX_OPEN_ROOMS = 1024


class RoomAssembler:
    """One room: checks each chunk's place in the sequence as it arrives and queues it for `run`.

    Chunk i must have chunk_index i and start at the token where chunk i-1 ended (so indices and
    tokens have no gap, duplicate or overlap), all row-carrying chunks share one (L, W, dtype), and the
    last chunk's num_chunks must count every chunk. Token coverage of [0, num_tokens) is checked by
    `run`, which alone knows num_tokens.
    """

    def __init__(self, room_id: str, max_buffer_bytes: int = DEFAULT_MAX_ROOM_BUFFER_BYTES) -> None:
        self.room_id = room_id
        self.max_buffer_bytes = max_buffer_bytes
        self.created_s = time.monotonic()
        self.claimed = False  # a `receive` is running for it
        self._queue: asyncio.Queue[DecodedChunk | TransferError] = asyncio.Queue()
        self._next_index = 0
        self._next_token = 0
        self._layout: tuple[int, int, object] | None = None
        self._saw_last = False
        self._error: TransferError | None = None
        self._buffered_bytes = 0
        self._written_tokens = 0

    @property
    def error(self) -> TransferError | None:
        return self._error

    def progress(self) -> str:
        return f"{self._next_index} chunks arrived, {self._written_tokens} tokens written"

    def feed(self, chunk: DecodedChunk) -> None:
        """Take the next arriving chunk; a chunk out of sequence fails the room."""
        if self._error is not None:
            return
        if self._saw_last:
            log.warning("room %s: dropping chunk %d that came after the last one", self.room_id, chunk.chunk_index)
            return
        where = f"room {self.room_id!r}"
        if chunk.chunk_index != self._next_index:
            what = "duplicate" if chunk.chunk_index < self._next_index else "gap"
            self.fail(TransferError(f"{where}: {what}: got chunk {chunk.chunk_index}, expected {self._next_index}"))
            return
        if chunk.token_start != self._next_token:
            self.fail(TransferError(f"{where}: chunk {chunk.chunk_index} starts at token {chunk.token_start}, "
                                    f"expected {self._next_token}"))
            return
        if chunk.rows is not None:
            layout = (chunk.rows.shape[0], chunk.rows.shape[2], chunk.rows.dtype)
            if self._layout is not None and layout != self._layout:
                self.fail(TransferError(f"{where}: chunk {chunk.chunk_index} layout (L, W, dtype) {layout} "
                                        f"differs from {self._layout}"))
                return
            self._layout = layout
        if chunk.last and chunk.num_chunks != chunk.chunk_index + 1:
            self.fail(TransferError(f"{where}: last chunk says {chunk.num_chunks} chunks, "
                                    f"but {chunk.chunk_index + 1} arrived"))
            return
        if self._buffered_bytes + chunk.nbytes > self.max_buffer_bytes:
            why = "the writer lags" if self.claimed else "no receive was called for it"
            self.fail(TransferError(f"{where}: more than {self.max_buffer_bytes} bytes buffered ({why})"))
            return
        self._next_index += 1
        self._next_token = chunk.token_end
        self._saw_last = chunk.last
        self._buffered_bytes += chunk.nbytes
        self._queue.put_nowait(chunk)

    def fail(self, error: TransferError) -> None:
        """Fail the room unless its last chunk already arrived (then every byte is here; keep it)."""
        if self._saw_last:
            return
        self.abort(error)

    def abort(self, error: TransferError) -> None:
        """Fail the room whatever arrived (cancel, close); buffered chunks are dropped."""
        if self._error is None:
            self._error = error
            self._queue.put_nowait(error)

    async def run(self, num_tokens: int, write: RowWriter) -> tuple[FirstToken, int]:
        """Write chunks in order as they come until the last; return (first token, data bytes received).

        Raises TransferError when the room fails or its chunks do not cover exactly [0, num_tokens).
        """
        received = 0
        while True:
            if self._error is not None:
                raise self._error
            item = await self._queue.get()
            if isinstance(item, TransferError):
                raise item
            self._buffered_bytes -= item.nbytes
            if item.token_end > num_tokens:
                raise TransferError(f"room {self.room_id!r}: chunk {item.chunk_index} has rows up to token "
                                    f"{item.token_end}, but the room has {num_tokens} tokens")
            if item.rows is not None:
                write(item.token_start, item.rows)
            self._written_tokens = item.token_end
            received += item.nbytes
            if item.last:
                if item.token_end != num_tokens:
                    raise TransferError(f"room {self.room_id!r}: the last chunk came after token {item.token_end}, "
                                        f"but the room has {num_tokens} tokens")
                assert item.first is not None  # decode_chunk sets it on every last chunk
                return item.first, received


class IncomingTransfers:
    """The KV transfers one receiver is assembling, keyed by room id (kvtransfer's `RoomRegistry` only pairs a
    room's sender with its receiver; the bytes are put together here). Not thread-safe: use it from the
    receiver's event loop."""

    def __init__(self, *, max_room_buffer_bytes: int = DEFAULT_MAX_ROOM_BUFFER_BYTES,
                 max_unclaimed_rooms: int = DEFAULT_MAX_UNCLAIMED_ROOMS,
                 unclaimed_ttl_s: float = DEFAULT_UNCLAIMED_TTL_S,
                 max_ended_rooms: int = DEFAULT_MAX_ENDED_ROOMS) -> None:
        self.max_room_buffer_bytes = max_room_buffer_bytes
        self.max_unclaimed_rooms = max_unclaimed_rooms
        self.unclaimed_ttl_s = unclaimed_ttl_s
        self.max_ended_rooms = max_ended_rooms
        self._rooms: dict[str, RoomAssembler] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()  # room id -> how it ended
        self._closed: TransferError | None = None

    def __len__(self) -> int:
        return len(self._rooms)

    def ended(self, room_id: str) -> bool:
        """Whether the room ended (received, cancelled, failed, dropped) within the remembered window."""
        return room_id in self._ended

    def deliver(self, chunk: DecodedChunk) -> None:
        """Route a verified chunk to its room (held until `receive` when none runs yet)."""
        room = self._room(chunk.room_id)
        if room is not None:
            room.feed(chunk)

    def fail(self, room_id: str, error: TransferError) -> None:
        """A chunk of the room could not be decoded, or its sender went away: its `receive` raises `error`."""
        room = self._room(room_id)
        if room is not None:
            room.fail(error)

    def cancel(self, room_id: str) -> None:
        """Stop waiting for a room: a running `receive` raises TransferError, buffered and later chunks are dropped."""
        room = self._rooms.get(room_id)
        if room is not None:
            room.abort(TransferError(f"room {room_id!r}: cancelled"))
            if not room.claimed:
                self._end(room_id, "cancelled")
        else:
            self._end(room_id, "cancelled")

    def close(self) -> None:
        """Fail every room; later deliveries are dropped and later receives raise."""
        self._closed = TransferError("the KV receiver is closed")
        for room_id, room in list(self._rooms.items()):
            room.abort(self._closed)
            if not room.claimed:
                del self._rooms[room_id]

    async def receive(self, room_id: str, num_tokens: int, write: RowWriter,
                      timeout_s: float) -> tuple[FirstToken, int]:
        """`KvReceiver.receive` for any plane: wait for the room's chunks and write them; see base.py."""
        if self._closed is not None:
            raise self._closed
        if room_id in self._ended:
            raise TransferError(f"room {room_id!r}: already ended ({self._ended[room_id]})")
        room = self._rooms.get(room_id)
        if room is None:
            room = self._rooms[room_id] = RoomAssembler(room_id, self.max_room_buffer_bytes)
        elif room.claimed:
            raise TransferError(f"room {room_id!r}: already being received")
        room.claimed = True
        outcome = "failed"
        try:
            result = await asyncio.wait_for(room.run(num_tokens, write), timeout_s)
            outcome = "received"
            return result
        except asyncio.TimeoutError:
            outcome = "timed out"
            raise TransferError(f"room {room_id!r}: timed out after {timeout_s:g} s "
                                f"({room.progress()}, {num_tokens} tokens expected)") from None
        except TransferError as e:
            outcome = f"failed: {e}"
            raise
        finally:
            self._rooms.pop(room_id, None)
            self._end(room_id, outcome)

    def _room(self, room_id: str) -> RoomAssembler | None:
        if self._closed is not None or room_id in self._ended:
            return None
        room = self._rooms.get(room_id)
        if room is not None:
            return room
        self._expire_unclaimed()
        unclaimed = sum(1 for r in self._rooms.values() if not r.claimed)
        if unclaimed >= self.max_unclaimed_rooms:
            log.warning("dropping room %s: %d rooms already wait for their receive", room_id, unclaimed)
            self._end(room_id, f"dropped: more than {self.max_unclaimed_rooms} rooms waited for their receive")
            return None
        room = self._rooms[room_id] = RoomAssembler(room_id, self.max_room_buffer_bytes)
        return room

    def _expire_unclaimed(self) -> None:
        deadline = time.monotonic() - self.unclaimed_ttl_s
        for room_id, room in list(self._rooms.items()):
            if not room.claimed and room.created_s < deadline:
                log.warning("dropping room %s: no receive within %g s", room_id, self.unclaimed_ttl_s)
                del self._rooms[room_id]
                self._end(room_id, f"dropped: no receive within {self.unclaimed_ttl_s:g} s")

    def _end(self, room_id: str, how: str) -> None:
        self._ended[room_id] = how
        self._ended.move_to_end(room_id)
        while len(self._ended) > self.max_ended_rooms:
            self._ended.popitem(last=False)


class AssemblingReceiver(KvReceiver):
    """A receiver whose plane hands what arrives to `self._incoming`: waiting for a room and cancelling one are
    IncomingTransfers' own."""

    _incoming: IncomingTransfers

    async def receive(self, room_id: str, num_tokens: int, write: RowWriter,
                      timeout_s: float) -> tuple[FirstToken, int]:
        return await self._incoming.receive(room_id, num_tokens, write, timeout_s)

    async def cancel(self, room_id: str) -> None:
        self._incoming.cancel(room_id)


class ConnectionRooms:
    """The rooms one sender's connection (ucx, tcp) started and has not ended: each chunk that arrives on it goes
    to `incoming` through `deliver`, and when the connection ends `fail_all` fails the rooms it left unfinished."""

    def __init__(self, incoming: IncomingTransfers) -> None:
        self.incoming = incoming
        self.open: set[str] = set()

    def deliver(self, header: kvtransfer_pb2.KvChunk, data: np.ndarray) -> None:
        """Verify and hand on one chunk (header and its row bytes); a chunk that fails its checks fails its room."""
        room_id = header.room_id
        if header.last:
            self.open.discard(room_id)
        else:
            self.open.add(room_id)
            if len(self.open) > _MAX_OPEN_ROOMS:
                # Rooms whose sender was cancelled never send a last chunk; forget the ended ones.
                self.open = {r for r in self.open if not self.incoming.ended(r)}
        try:
            self.incoming.deliver(decode_chunk(header, data))
        except TransferError as e:
            self.incoming.fail(room_id, e)

    def fail_all(self, why: str) -> None:
        """The connection ended (`why`): fail every room it left without its last chunk."""
        for room_id in self.open:
            self.incoming.fail(room_id, TransferError(f"room {room_id!r}: {why} before the last chunk"))
        self.open.clear()
