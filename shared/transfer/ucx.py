"""The UCX data plane through `ucxx` (asyncio API): RDMA where the hardware has it, TCP or shared memory
otherwise. The decode worker listens on a port; the prefill worker keeps one endpoint per receiver
address and sends every room for that receiver over it.

Wire format, per chunk, two UCX tag messages on the endpoint's default tag (UCX keeps their order):
  1. the frame and header of frames.py (at most MAX_FRAME_BYTES, so the receiver posts one fixed buffer);
  2. the row bytes, sent straight from the rows' buffer; omitted when there are none.
A sender holds a per-endpoint lock around each pair so chunks of rooms sent concurrently never interleave.

Closing: a completed UCX send only means the buffer was handed to the transport, and ucxx closes an
endpoint by force, dropping what is still in flight. So a sender that closes first sends a frame with
flags FLAG_BYE (H = D = 0) and waits for the receiver's FLAG_BYE_ACK frame: the receiver answers only
after reading everything before the bye (UCX keeps the order), so every chunk sent has arrived.

`ucxx` is imported when a backend is created, never at import time of this module, after setting
UCX_TLS=tcp,sm,self and UCX_WARN_UNUSED_ENV_VARS=n unless the user set them (set UCX_TLS to use RDMA).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from types import ModuleType
from typing import Any

import numpy as np

from moemesh.transfer.assembler import AssemblingReceiver, ConnectionRooms, IncomingTransfers
from moemesh.transfer.base import PlaneUnavailable, TransferError
from moemesh.transfer.chunk import EncodedChunk
from moemesh.transfer.faults import FaultInjector, KvFaults
from moemesh.transfer.frames import (
    FRAME,
    MAX_FRAME_BYTES,
    CorruptFrame,
    chunk_frame,
    control_frame,
    frame_lengths,
    parse_address,
    parse_header,
)
from moemesh.transfer.peers import ConnectionSender, connect_or_fail
from moemesh.v1 import kvtransfer_pb2

log = logging.getLogger(__name__)

FLAG_BYE = 1  # sender -> receiver: no more chunks on this endpoint; answer when all before it arrived
FLAG_BYE_ACK = 2  # receiver -> sender: everything before the bye was read
# UCX moves big buffers without protobuf's copies, so chunks can be larger than the relay's.
DEFAULT_CHUNK_BYTES = 16 * 2**20
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_SEND_TIMEOUT_S = 30.0
# How long closing a sender waits for each receiver to confirm it read everything.
DEFAULT_BYE_TIMEOUT_S = 5.0


def load_ucxx() -> ModuleType:
    """Import ucxx (with this plane's UCX defaults); PlaneUnavailable naming the package when it is missing."""
    os.environ.setdefault("UCX_TLS", "tcp,sm,self")
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    # ucxx's default progress thread costs an idle receiver about 5% of a core (ucxx 0.52, measured);
    # its "blocking" mode, driven by the event loop, costs under 1% but progresses nothing while the
    # loop is busy or gone. Both are correct since closing waits for the receiver's FLAG_BYE_ACK; the
    # default stays ucxx's; set UCXPY_PROGRESS_MODE to choose.
    try:
        import ucxx
    except Exception as e:  # ImportError, or OSError when libucx itself cannot load
        raise PlaneUnavailable(
            f"the ucx KV data plane needs the package ucxx-cu12 (pip install 'moemesh[ucx]', or "
            f"pip install -e '.[ucx]' from a checkout), which failed to import ({type(e).__name__}: {e}); "
            f"use --transfer relay to send KV through kvtransfer instead"
        ) from e
    return ucxx


def _frame_flags(frame: bytearray) -> int:
    """The flags of a frame whose header and data are not needed (the bye and its answer)."""
    return frame_lengths(frame)[0]


def _parse_frame(frame: bytearray) -> tuple[kvtransfer_pb2.KvChunk, int]:
    flags, header_len, data_len = frame_lengths(frame)
    if flags:
        raise CorruptFrame(f"a chunk frame with flags {flags:#x}")
    return parse_header(memoryview(frame)[FRAME.size:FRAME.size + header_len]), data_len


class UcxReceiver(AssemblingReceiver):
    """Listens for senders on `port` (0: any free one) on every interface; `address` is "host:port",
    with `host` the name senders should dial. `limits` tunes its IncomingTransfers."""

    plane = "ucx"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **limits: Any) -> None:
        self._ucxx = load_ucxx()
        self.host = host
        self.port = port
        self._incoming = IncomingTransfers(**limits)
        self._listener: Any = None
        self._readers: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self) -> None:
        # ucxx's listener binds every interface; it cannot be limited to `host`.
        self._listener = self._ucxx.create_listener(self._on_connect, port=self.port)
        self.port = self._listener.port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _on_connect(self, ep: Any) -> None:
        # Runs in ucxx's per-connection handler on our loop; the reader is our own task so the handler
        # returns at once and close() can stop the reader.
        if self._closed:
            ep.abort()
            return
        task = asyncio.get_running_loop().create_task(self._read(ep))
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def _read(self, ep: Any) -> None:
        frame = bytearray(MAX_FRAME_BYTES)
        rooms = ConnectionRooms(self._incoming)
        why = "the sender's connection closed"
        try:
            while True:
                await ep.recv(frame)
                if _frame_flags(frame) == FLAG_BYE:
                    # Keep reading after the answer: closing here could drop the answer itself; the
                    # sender closes the endpoint once it has it, which ends this loop.
                    await ep.send(control_frame(FLAG_BYE_ACK))
                    why = "the sender closed the connection"
                    continue
                header, data_len = _parse_frame(frame)
                data = np.empty(data_len, dtype=np.uint8)
                if data_len:
                    await ep.recv(data)
                rooms.deliver(header, data)
        except CorruptFrame as e:
            why = f"corrupt frame from the sender ({e})"
            log.warning("closing a UCX connection: %s", why)
        except asyncio.CancelledError:
            why = "the receiver closed"
            raise
        except self._ucxx.exceptions.UCXError as e:  # how ucxx reports a closed or broken endpoint
            log.debug("UCX connection ended: %s: %s", type(e).__name__, e)
        except Exception:
            why = "the receiver failed reading the connection"
            log.exception("UCX receive loop failed")
        finally:
            rooms.fail_all(why)
            with contextlib.suppress(Exception):
                ep.abort()

    async def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._incoming.close()
        readers = list(self._readers)
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


class _Peer:
    """One endpoint to one receiver, shared by every room sent there."""

    def __init__(self, ep: Any) -> None:
        self.ep = ep
        self.lock = asyncio.Lock()  # held for a chunk's frame + data pair
        self.broken = False

    @property
    def usable(self) -> bool:
        return not self.broken and not self.ep.closed

    async def send_pair(self, frame: bytearray, data: np.ndarray) -> None:
        async with self.lock:
            if self.broken:
                raise TransferError("the UCX endpoint failed during an earlier chunk")
            try:
                await self.ep.send(frame)
                if data.nbytes:
                    await self.ep.send(data)
            except BaseException:
                # Half a pair may be on the wire: nothing more can go over this endpoint.
                self.abort()
                raise

    async def bye(self, timeout_s: float) -> bool:
        """Tell the receiver no more chunks come and wait until it has read all sent; False when it
        did not answer in time or the endpoint failed (what was in flight may then be lost)."""
        answer = bytearray(FRAME.size)
        try:
            # The bound covers the lock too: a pair stuck on a receiver that stopped reading holds it.
            return await asyncio.wait_for(self._bye_exchange(answer), timeout_s)
        except Exception as e:  # TimeoutError, a UCX error, a corrupt answer
            log.debug("UCX bye got no answer: %s: %s", type(e).__name__, e)
            return False

    async def _bye_exchange(self, answer: bytearray) -> bool:
        async with self.lock:
            if not self.usable:
                return False
            await self.ep.send(control_frame(FLAG_BYE))
            await self.ep.recv(answer)
            return _frame_flags(answer) == FLAG_BYE_ACK

    def abort(self) -> None:
        self.broken = True
        with contextlib.suppress(Exception):
            self.ep.abort()


class UcxSender(ConnectionSender[_Peer]):
    """Sends rooms to UcxReceivers, one endpoint per receiver address, reconnecting when one failed."""

    plane = "ucx"

    def __init__(self, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S, faults: KvFaults | None = None,
                 bye_timeout_s: float = DEFAULT_BYE_TIMEOUT_S) -> None:
        super().__init__()
        self._ucxx = load_ucxx()
        self.faults = FaultInjector.for_sender(faults)  # MOEMESH_FAULT_KV; None when off
        self.max_chunk_bytes = max_chunk_bytes
        self.connect_timeout_s = connect_timeout_s
        self.send_timeout_s = send_timeout_s
        self.bye_timeout_s = bye_timeout_s
        self._pending: set[asyncio.Task[None]] = set()

    async def _connect(self, room_id: str, address: str) -> _Peer:
        host, port = parse_address(address, "UCX")
        attempt = self._ucxx.create_endpoint(host, port, connect_timeout=self.connect_timeout_s)
        # ucxx raises its own errors, not OSError; its own timeout gets a second to report first
        return _Peer(await connect_or_fail(room_id, address, "UCX", attempt, self.connect_timeout_s, (Exception,), 1.0))

    async def _send_chunk(self, room_id: str, address: str, peer: _Peer, chunk: EncodedChunk) -> None:
        # The pair runs in its own task, shielded: a cancelled room still finishes the chunk on the wire
        # (bounded by send_timeout_s) rather than leave half of it and break every room on the endpoint.
        task = asyncio.ensure_future(peer.send_pair(chunk_frame(chunk), chunk.data))
        self._pending.add(task)
        task.add_done_callback(self._settled)
        try:
            await asyncio.wait_for(asyncio.shield(task), self.send_timeout_s)
        except asyncio.TimeoutError:
            peer.abort()
            self._pool.forget(address, peer)
            raise TransferError(f"room {room_id!r}: the UCX receiver at {address} took no chunk for "
                                f"{self.send_timeout_s:g} s") from None
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._pool.forget(address, peer)
            raise TransferError(f"room {room_id!r}: UCX send to {address} failed: {type(e).__name__}: {e}") from e

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved here: a shielded pair may fail after its room stopped waiting

    async def close(self) -> None:
        """Finish the chunks on the wire, make sure every receiver has read them, then close."""
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=self.send_timeout_s)
        peers = self._pool.take_all()
        answered = await asyncio.gather(*(p.bye(self.bye_timeout_s) for p in peers.values()))
        for (address, peer), ok in zip(peers.items(), answered, strict=True):
            if not ok and peer.usable:
                log.warning("the UCX receiver at %s did not confirm the last chunks within %g s; closing anyway",
                            address, self.bye_timeout_s)
            peer.abort()
