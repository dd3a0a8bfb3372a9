"""What the planes that keep a connection per receiver (tcp, ucx) share: the connection reused by every room and
made again after it broke, peers going away mid-room on either side, a corrupt chunk failing its room alone, a
cancelled send leaving the connection in step, and a malformed address. Real connections on loopback (UCX over
TCP and shared memory). L layers, N tokens, W row width."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import socket
import struct
import time

import pytest
import torch

from moemesh.transfer.base import FirstToken, RowBlock, TransferError
from moemesh.transfer.registry import make_sender
from tests.service.transfer.test_transfer_planes import bits, move, plane_pair, prefill_blocks, random_rows, resolved

CONNECTED = ["tcp", pytest.param("ucx", marks=pytest.mark.skipif(
    importlib.util.find_spec("ucxx") is None, reason="ucxx-cu12 not installed"))]
# How a sender reports a receiver that went away while a room was still being sent.
SEND_FAILED = {"tcp": r"the TCP receiver at .* closed the connection", "ucx": r"UCX send to .* failed"}


async def stalled_blocks(rows: torch.Tensor, gate: asyncio.Event):
    """The first half of rows [L, N, W], then a wait on `gate`, then the rest."""
    half = rows.shape[1] // 2
    yield RowBlock(0, rows[:, :half])
    await gate.wait()
    yield RowBlock(half, rows[:, half:])


def start_stalled_room(sender, receiver, rows: torch.Tensor, timeout_s: float
                       ) -> tuple[asyncio.Event, asyncio.Future, asyncio.Future]:
    """Room "r": its send stopped after the first half of rows [L, N, W] until the event is set, and its receive."""
    gate = asyncio.Event()
    send = asyncio.ensure_future(sender.send("r", receiver.address, stalled_blocks(rows, gate),
                                             resolved(FirstToken(1))))
    recv = asyncio.ensure_future(receiver.receive("r", rows.shape[1], lambda s, r: None, timeout_s))
    return gate, send, recv


def lose_connection(plane: str, peer) -> None:
    """End a sender's connection as a failing network does: a reset (TCP: no FIN), a dropped endpoint (UCX)."""
    if plane == "tcp":
        sock = peer.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.abort()


@pytest.mark.parametrize("plane", CONNECTED)
def test_connection_is_reused_and_made_again_after_a_failure(plane: str) -> None:
    rows = random_rows((2, 50, 64))

    async def main():
        async with plane_pair(plane) as (sender, receiver):
            await move(sender, receiver, "a", rows, FirstToken(1))
            peer = sender._peers[receiver.address]
            await move(sender, receiver, "b", rows, FirstToken(2))
            assert sender._peers[receiver.address] is peer
            peer.abort()  # as if the link broke between rooms
            await asyncio.sleep(0)
            pages, first, _, _ = await move(sender, receiver, "c", rows, FirstToken(3))
            assert sender._peers[receiver.address] is not peer
            return pages, first

    pages, first = asyncio.run(main())
    assert torch.equal(bits(pages), bits(rows)) and first == FirstToken(3)


@pytest.mark.parametrize("plane", CONNECTED)
def test_receiver_gone_mid_room_fails_the_sender(plane: str) -> None:
    rows = random_rows((2, 64, 64))

    async def main():
        async with plane_pair(plane) as (sender, receiver):
            gate, send, recv = start_stalled_room(sender, receiver, rows, 10.0)
            await asyncio.sleep(0.2)
            await receiver.close()
            with pytest.raises(TransferError, match="closed"):
                await recv
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            gate.set()
            with pytest.raises(TransferError, match=SEND_FAILED[plane]):
                await asyncio.wait_for(send, 10.0)
            return time.monotonic() - t0

    assert asyncio.run(main()) < 5.0


# "close": the sender closes (UCX with its goodbye; TCP with a FIN, as when its process exits); "lost": the
# connection just goes away.
@pytest.mark.parametrize(("how", "why"), [("close", "the sender closed the connection"),
                                          ("lost", "the sender's connection closed")])
@pytest.mark.parametrize("plane", CONNECTED)
def test_sender_gone_mid_room_fails_the_receive_at_once(plane: str, how: str, why: str) -> None:
    rows = random_rows((2, 64, 64))

    async def main():
        async with plane_pair(plane) as (sender, receiver):
            _, send, recv = start_stalled_room(sender, receiver, rows, 20.0)
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            if how == "close":
                await sender.close()
            else:
                lose_connection(plane, sender._peers[receiver.address])
            with pytest.raises(TransferError, match=f"{why} before the last chunk"):
                await asyncio.wait_for(recv, 5.0)
            send.cancel()
            return time.monotonic() - t0

    assert asyncio.run(main()) < 3.0


@pytest.mark.parametrize("plane", CONNECTED)
def test_corrupt_chunk_fails_its_room_only(plane: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module(f"moemesh.transfer.{plane}")
    rows = random_rows(seed=5)  # several row chunks at the test's chunk size; chunk 1 carries rows
    original = module.chunk_frame

    def corrupting_frame(chunk):
        if chunk.header.room_id == "bad" and chunk.header.chunk_index == 1:
            chunk.header.checksum_crc32 ^= 1
        return original(chunk)

    async def main():
        async with plane_pair(plane) as (sender, receiver):
            monkeypatch.setattr(module, "chunk_frame", corrupting_frame)
            with pytest.raises(TransferError, match="chunk 1: checksum mismatch"):
                await move(sender, receiver, "bad", rows, FirstToken(1))
            monkeypatch.undo()
            return await move(sender, receiver, "good", rows, FirstToken(2))  # same connection, still in step

    pages, first, _, _ = asyncio.run(main())
    assert torch.equal(bits(pages), bits(rows)) and first == FirstToken(2)


@pytest.mark.parametrize("plane", CONNECTED)
def test_cancelled_send_leaves_the_connection_usable(plane: str) -> None:
    big = random_rows((4, 300, 576), seed=2)
    small = random_rows((2, 30, 64), seed=3)

    async def main():
        async with plane_pair(plane) as (sender, receiver):
            gate = asyncio.Event()
            doomed = asyncio.ensure_future(sender.send("doomed", receiver.address, stalled_blocks(big, gate),
                                                       resolved(FirstToken(1))))
            await asyncio.sleep(0.1)
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed
            await receiver.cancel("doomed")
            peer = sender._peers[receiver.address]
            result = await move(sender, receiver, "next", small, FirstToken(2))
            assert sender._peers[receiver.address] is peer
            return result

    pages, first, _, _ = asyncio.run(main())
    assert torch.equal(bits(pages), bits(small)) and first == FirstToken(2)


@pytest.mark.parametrize("plane", CONNECTED)
def test_bad_address(plane: str) -> None:
    async def main():
        sender = make_sender(plane)
        try:
            with pytest.raises(TransferError, match=f"bad {plane.upper()} address 'nonsense': expected host:port"):
                await sender.send("r", "nonsense", prefill_blocks(random_rows((1, 2, 4))), resolved(FirstToken(1)))
        finally:
            await sender.close()

    asyncio.run(main())
