"""The senders of the planes that keep a connection per receiver (ucx, tcp): one connection per receiver address,
shared by every room sent there, made on first use and again after one broke; the send loop they share."""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, Protocol, TypeVar

from moemesh.transfer.base import FirstToken, KvSender, RowBlock, TransferError
from moemesh.transfer.chunk import EncodedChunk, discard, iter_chunks
from moemesh.transfer.faults import FaultInjector


class Connection(Protocol):
    @property
    def usable(self) -> bool:
        """False once the connection failed or closed: the next room makes a new one."""


P = TypeVar("P", bound=Connection)
T = TypeVar("T")


async def connect_or_fail(room_id: str, address: str, plane: str, attempt: Awaitable[T], timeout_s: float,
                          errors: tuple[type[BaseException], ...] = (OSError,), grace_s: float = 0.0) -> T:
    """`attempt`'s result, or TransferError naming the room, the receiver and why: no answer within `timeout_s`
    (+ `grace_s`, for an attempt with a timeout of its own), or one of `errors`."""
    try:
        return await asyncio.wait_for(attempt, timeout_s + grace_s)
    except asyncio.TimeoutError:
        raise TransferError(f"room {room_id!r}: no {plane} receiver answered at {address} within "
                            f"{timeout_s:g} s") from None
    except errors as e:
        raise TransferError(f"room {room_id!r}: cannot connect to the {plane} receiver at {address}: "
                            f"{type(e).__name__}: {e}") from e


class Peers(Generic[P]):
    """Receiver address -> its open connection. Connecting is serialised per address, so rooms that start at once
    share the one connection the first of them makes."""

    def __init__(self) -> None:
        self.by_address: dict[str, P] = {}
        self._connecting: dict[str, asyncio.Lock] = {}

    async def get(self, address: str, connect: Callable[[], Awaitable[P]]) -> P:
        """The connection to `address` if it is still usable, else a new one from `connect` (whose errors pass)."""
        peer = self.by_address.get(address)
        if peer is not None and peer.usable:
            return peer
        async with self._connecting.setdefault(address, asyncio.Lock()):
            peer = self.by_address.get(address)
            if peer is not None and peer.usable:
                return peer
            peer = self.by_address[address] = await connect()
            return peer

    def forget(self, address: str, peer: P) -> None:
        """Drop `peer` (it failed) unless another connection already replaced it."""
        if self.by_address.get(address) is peer:
            del self.by_address[address]

    def take_all(self) -> dict[str, P]:
        """Every connection, removed from here (for closing them)."""
        out = dict(self.by_address)
        self.by_address.clear()
        return out


class ConnectionSender(KvSender, Generic[P]):
    """A sender that keeps one connection per receiver address: it connects before a room's first block, then hands
    each chunk to `_send_chunk`. Subclasses set `max_chunk_bytes` and `faults` and give `_connect` and
    `_send_chunk`."""

    max_chunk_bytes: int
    faults: FaultInjector | None

    def __init__(self) -> None:
        self._pool: Peers[P] = Peers()

    @property
    def _peers(self) -> dict[str, P]:
        return self._pool.by_address

    async def send(self, room_id: str, address: str, blocks: AsyncIterator[RowBlock],
                   first: Awaitable[FirstToken]) -> int:
        # Connect before the first block: a dead receiver fails the room early, and a new connection's
        # handshake overlaps the prefill computing that block.
        try:
            peer = await self._pool.get(address, lambda: self._connect(room_id, address))
        except BaseException:
            discard(first)
            raise
        sent = 0
        stream = iter_chunks(room_id, blocks, first, self.max_chunk_bytes)
        async with contextlib.aclosing(self.faults.wrap(stream) if self.faults else stream) as chunks:
            async for chunk in chunks:
                await self._send_chunk(room_id, address, peer, chunk)
                sent += chunk.nbytes
        return sent

    @abc.abstractmethod
    async def _connect(self, room_id: str, address: str) -> P:
        """A new connection to the receiver at `address`; TransferError when it cannot be made."""

    @abc.abstractmethod
    async def _send_chunk(self, room_id: str, address: str, peer: P, chunk: EncodedChunk) -> None:
        """Put one chunk on `peer` whole; TransferError (after `self._pool.forget`) when the connection failed."""
