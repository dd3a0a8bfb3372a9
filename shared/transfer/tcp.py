"""The TCP data plane: the prefill worker writes a room's chunks straight to the decode worker's socket, with no
process between them (the relay passes every byte through kvtransfer and through gRPC's messages twice).

The decode worker listens on host:port (loopback unless configured otherwise); the prefill worker keeps one
connection per receiver address and sends every room for that receiver over it. Per chunk: the frame, header
and rows of frames.py, written in one go, so chunks of rooms sent concurrently never interleave and a
cancelled room never leaves half a chunk on the wire. TCP keeps the order and delivers what was written before
a close, so unlike UCX no closing handshake is needed. The receiver reads rows straight into the buffer their
tensor will use (`asyncio.BufferedProtocol`): one copy from the kernel, none in Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import numpy as np

from moemesh.transfer.assembler import AssemblingReceiver, ConnectionRooms, IncomingTransfers
from moemesh.transfer.base import TransferError
from moemesh.transfer.chunk import EncodedChunk
from moemesh.transfer.faults import FaultInjector, KvFaults
from moemesh.transfer.frames import FRAME, CorruptFrame, chunk_frame, frame_lengths, parse_address, parse_header
from moemesh.transfer.peers import ConnectionSender, connect_or_fail

log = logging.getLogger(__name__)

# No protobuf copy of the rows on this plane, so chunks can be as large as UCX's.
DEFAULT_CHUNK_BYTES = 16 * 2**20
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_SEND_TIMEOUT_S = 30.0


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Connection(asyncio.BufferedProtocol):
    """One sender's connection: reads frame, header and rows in turn, each into a buffer of exactly its size."""

    def __init__(self, receiver: TcpReceiver) -> None:
        self.receiver = receiver
        self.transport: asyncio.Transport | None = None
        self.rooms = ConnectionRooms(receiver._incoming)
        self.why = "the sender's connection closed"
        self._expect_frame()

    def _expect(self, buf: bytearray | np.ndarray) -> None:
        self._buf = buf
        self._view = memoryview(buf).cast("B")
        self._filled = 0

    def _expect_frame(self) -> None:
        self._stage = "frame"
        self._expect(bytearray(FRAME.size))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.receiver._connections.add(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view[self._filled:]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if self._filled < len(self._view):
            return
        try:
            self._advance()
        except CorruptFrame as e:
            self.why = f"corrupt frame from the sender ({e})"
            log.warning("closing a TCP KV connection: %s", self.why)
            assert self.transport is not None
            self.transport.abort()  # connection_lost fails this connection's open rooms

    def _advance(self) -> None:
        """The current buffer is full: move to the next part of the chunk, delivering it when complete."""
        if self._stage == "frame":
            flags, header_len, self._data_len = frame_lengths(self._buf)
            if flags:
                raise CorruptFrame(f"a chunk frame with flags {flags:#x}")
            if header_len == 0:
                raise CorruptFrame("a chunk frame without a header")
            self._stage = "header"
            self._expect(bytearray(header_len))
        elif self._stage == "header":
            self._header = parse_header(self._buf)
            if self._data_len:
                self._stage = "data"
                self._expect(np.empty(self._data_len, dtype=np.uint8))
            else:
                self._deliver(np.empty(0, dtype=np.uint8))
        else:
            self._deliver(self._buf)

    def _deliver(self, data: np.ndarray) -> None:
        header = self._header
        self._expect_frame()
        self.rooms.deliver(header, data)

    def eof_received(self) -> bool:
        self.why = "the sender closed the connection"
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.receiver._connections.discard(self)
        if self.receiver._closed:
            self.why = "the receiver closed"
        self.rooms.fail_all(self.why)


class TcpReceiver(AssemblingReceiver):
    """Listens on host:port (port 0: any free one); `address` is "advertise_host:port" (default: host).
    `limits` tunes its IncomingTransfers."""

    plane = "tcp"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, advertise_host: str | None = None,
                 **limits: Any) -> None:
        self.host = host
        self.port = port
        self.advertise_host = advertise_host or host
        self._incoming = IncomingTransfers(**limits)
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._closed = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _Connection(self), self.host, self.port)
        except OSError as e:
            raise TransferError(f"the TCP KV receiver cannot listen on {_join(self.host, self.port)}: {e}") from e
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return _join(self.advertise_host, self.port)

    async def close(self) -> None:
        self._closed = True
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.abort()
        self._incoming.close()
        await asyncio.sleep(0)  # let the aborted connections' connection_lost run


class _Peer:
    """One connection to one receiver, shared by every room sent there."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @property
    def usable(self) -> bool:
        # The receiver never writes: an EOF means it closed the connection.
        return not self.writer.is_closing() and not self.reader.at_eof()

    def write(self, chunk: EncodedChunk) -> None:
        """Frame, header and rows in one synchronous go: nothing of another room can come between them."""
        self.writer.write(chunk_frame(chunk))
        if chunk.nbytes:
            self.writer.write(memoryview(chunk.data))

    def abort(self) -> None:
        self.writer.transport.abort()


class TcpSender(ConnectionSender[_Peer]):
    """Sends rooms to TcpReceivers, one connection per receiver address, reconnecting when one failed."""

    plane = "tcp"

    def __init__(self, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S, faults: KvFaults | None = None) -> None:
        super().__init__()
        self.max_chunk_bytes = max_chunk_bytes
        self.connect_timeout_s = connect_timeout_s
        self.send_timeout_s = send_timeout_s
        self.faults = FaultInjector.for_sender(faults)  # MOEMESH_FAULT_KV; None when off

    async def _connect(self, room_id: str, address: str) -> _Peer:
        host, port = parse_address(address, "TCP")
        reader, writer = await connect_or_fail(room_id, address, "TCP", asyncio.open_connection(host, port),
                                               self.connect_timeout_s)
        return _Peer(reader, writer)

    async def _send_chunk(self, room_id: str, address: str, peer: _Peer, chunk: EncodedChunk) -> None:
        if not peer.usable:
            self._pool.forget(address, peer)
            raise TransferError(f"room {room_id!r}: the TCP receiver at {address} closed the connection")
        peer.write(chunk)
        try:
            await asyncio.wait_for(peer.writer.drain(), self.send_timeout_s)
        except asyncio.TimeoutError:
            peer.abort()
            self._pool.forget(address, peer)
            raise TransferError(f"room {room_id!r}: the TCP receiver at {address} took no chunk for "
                                f"{self.send_timeout_s:g} s") from None
        except OSError as e:  # reset, broken pipe
            peer.abort()
            self._pool.forget(address, peer)
            raise TransferError(f"room {room_id!r}: TCP send to {address} failed: {type(e).__name__}: {e}") from e

    async def close(self) -> None:
        """Flush what was written and close every connection (the receiver still gets all of it)."""
        peers = list(self._pool.take_all().values())
        for peer in peers:
            peer.writer.close()
        for peer in peers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(peer.writer.wait_closed(), self.send_timeout_s)
