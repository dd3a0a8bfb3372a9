"""The in-process data plane (tests, single-process runs): a sender finds its receiver by address in a
module-level registry. Chunks still go through encode -> protobuf bytes -> decode + CRC check, so the
path a chunk takes is the one the network planes take, minus the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from moemesh.transfer.assembler import AssemblingReceiver, IncomingTransfers
from moemesh.transfer.base import FirstToken, KvSender, RowBlock, TransferError
from moemesh.transfer.chunk import DEFAULT_CHUNK_BYTES, decode_chunk, discard, iter_chunks
from moemesh.transfer.faults import FaultInjector, KvFaults
from moemesh.v1 import kvtransfer_pb2

# address ("inproc://<uuid>") -> the started receiver listening there.
_RECEIVERS: dict[str, InprocReceiver] = {}


class InprocReceiver(AssemblingReceiver):
    """Listens at a fresh "inproc://<uuid>" address in this process. `limits` tunes its IncomingTransfers."""

    plane = "inproc"

    def __init__(self, **limits: Any) -> None:
        self._address = f"inproc://{uuid.uuid4().hex}"
        self._incoming = IncomingTransfers(**limits)

    async def start(self) -> None:
        _RECEIVERS[self._address] = self

    @property
    def address(self) -> str:
        return self._address

    def deliver(self, payload: bytes) -> None:
        """One serialized KvChunk from a sender; a chunk that fails its checks fails its room."""
        msg = kvtransfer_pb2.KvChunk.FromString(payload)
        try:
            chunk = decode_chunk(msg)
        except TransferError as e:
            self._incoming.fail(msg.room_id, e)
            return
        self._incoming.deliver(chunk)

    async def close(self) -> None:
        _RECEIVERS.pop(self._address, None)
        self._incoming.close()


class InprocSender(KvSender):
    """Sends to an `InprocReceiver` of this process, in chunks of at most max_chunk_bytes."""

    plane = "inproc"

    def __init__(self, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, faults: KvFaults | None = None) -> None:
        self.max_chunk_bytes = max_chunk_bytes
        self.faults = FaultInjector.for_sender(faults)  # MOEMESH_FAULT_KV; None when off

    async def send(self, room_id: str, address: str, blocks: AsyncIterator[RowBlock],
                   first: Awaitable[FirstToken]) -> int:
        if address not in _RECEIVERS:
            discard(first)
            raise TransferError(f"room {room_id!r}: no in-process KV receiver at {address!r}")
        sent = 0
        stream = iter_chunks(room_id, blocks, first, self.max_chunk_bytes)
        async with contextlib.aclosing(self.faults.wrap(stream) if self.faults else stream) as chunks:
            async for chunk in chunks:
                # Looked up per chunk: a receiver closed mid-room is a peer gone, as on a network.
                receiver = _RECEIVERS.get(address)
                if receiver is None:
                    raise TransferError(f"room {room_id!r}: no in-process KV receiver at {address!r}")
                receiver.deliver(chunk.to_message().SerializeToString())
                sent += chunk.nbytes
                await asyncio.sleep(0)  # let the receiver run between chunks, as a network would
        return sent

    async def close(self) -> None:
        pass
