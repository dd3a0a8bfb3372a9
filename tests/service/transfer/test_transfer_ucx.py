"""The UCX plane's own behaviour: endpoint reuse and reconnection, peers going away mid-room, corrupt
chunks, a cancelled sender, and the error when ucxx is missing. Runs over TCP/shared memory on loopback."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest
import torch

from moemesh.transfer.base import FirstToken, PlaneUnavailable, RowBlock, TransferError
from moemesh.transfer.registry import make_receiver, make_sender
from tests.service.transfer.test_transfer_planes import bits, move, plane_pair, prefill_blocks, random_rows, resolved

try:
    from moemesh.transfer.ucx import load_ucxx

    load_ucxx()
except PlaneUnavailable as e:  # only where ucxx truly cannot import; it can wherever moemesh[ucx] is installed
    pytest.skip(f"ucxx unavailable: {e}", allow_module_level=True)


def test_missing_ucxx_names_the_package_and_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ucxx", None)  # makes `import ucxx` raise ImportError
    for make in (make_receiver, make_sender):
        with pytest.raises(PlaneUnavailable, match=r"ucxx-cu12.*moemesh\[ucx\].*--transfer relay"):
            make("ucx")


def test_endpoint_is_reused_and_reconnected_after_a_failure() -> None:
    rows = random_rows((2, 50, 64))

    async def main():
        async with plane_pair("ucx") as (sender, receiver):
            await move(sender, receiver, "a", rows, FirstToken(1))
            peer = sender._peers[receiver.address]
            await move(sender, receiver, "b", rows, FirstToken(2))
            assert sender._peers[receiver.address] is peer
            peer.abort()  # as if the link broke between rooms
            pages, first, _, _ = await move(sender, receiver, "c", rows, FirstToken(3))
            assert sender._peers[receiver.address] is not peer
            return pages, first

    pages, first = asyncio.run(main())
    assert torch.equal(bits(pages), bits(rows)) and first == FirstToken(3)


async def _stalled_blocks(rows: torch.Tensor, gate: asyncio.Event):
    """The first half of rows [L, N, W], then a wait on `gate`, then the rest."""
    half = rows.shape[1] // 2
    yield RowBlock(0, rows[:, :half])
    await gate.wait()
    yield RowBlock(half, rows[:, half:])


def test_receiver_gone_mid_room_fails_the_sender() -> None:
    rows = random_rows((2, 64, 64))

    async def main():
        async with plane_pair("ucx") as (sender, receiver):
            gate = asyncio.Event()
            send = asyncio.ensure_future(sender.send("r", receiver.address, _stalled_blocks(rows, gate),
                                                     resolved(FirstToken(1))))
            recv = asyncio.ensure_future(receiver.receive("r", 64, lambda s, r: None, 10.0))
            await asyncio.sleep(0.2)
            await receiver.close()
            with pytest.raises(TransferError, match="closed"):
                await recv
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            gate.set()
            with pytest.raises(TransferError, match=r"UCX send to .* failed"):
                await asyncio.wait_for(send, 10.0)
            return time.monotonic() - t0

    assert asyncio.run(main()) < 5.0


# "close": the sender closes (with its goodbye); "lost": the endpoint just goes away, as when the
# sender's process dies.
@pytest.mark.parametrize(("how", "why"), [("close", "the sender closed the connection"),
                                          ("lost", "the sender's connection closed")])
def test_sender_gone_mid_room_fails_the_receive_at_once(how: str, why: str) -> None:
    rows = random_rows((2, 64, 64))

    async def main():
        async with plane_pair("ucx") as (sender, receiver):
            gate = asyncio.Event()
            send = asyncio.ensure_future(sender.send("r", receiver.address, _stalled_blocks(rows, gate),
                                                     resolved(FirstToken(1))))
            recv = asyncio.ensure_future(receiver.receive("r", 64, lambda s, r: None, 20.0))
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            if how == "close":
                await sender.close()
            else:
                sender._peers[receiver.address].abort()
            with pytest.raises(TransferError, match=f"{why} before the last chunk"):
                await asyncio.wait_for(recv, 5.0)
            send.cancel()
            return time.monotonic() - t0

    assert asyncio.run(main()) < 3.0


def test_close_is_bounded_when_a_chunk_is_stuck() -> None:
    # A pair that never finishes (a receiver that stopped reading) holds the endpoint's lock; closing
    # must still end within its goodbye bound rather than wait for the lock forever.
    async def main():
        async with plane_pair("ucx") as (sender, receiver):
            await move(sender, receiver, "r", random_rows((2, 30, 64), seed=4), FirstToken(1))
            await sender._peers[receiver.address].lock.acquire()
            sender.bye_timeout_s = 0.5
            t0 = time.monotonic()
            await sender.close()
            return time.monotonic() - t0

    assert asyncio.run(main()) < 3.0


def test_corrupt_chunk_fails_its_room_only() -> None:
    from moemesh.transfer import ucx

    rows = random_rows(seed=5)  # several row chunks; chunk 1 carries rows

    async def main():
        async with plane_pair("ucx") as (sender, receiver):
            original = ucx.chunk_frame

            def corrupting_frame(chunk):
                if chunk.header.room_id == "bad" and chunk.header.chunk_index == 1:
                    chunk.header.checksum_crc32 ^= 1
                return original(chunk)

            ucx.chunk_frame = corrupting_frame
            try:
                with pytest.raises(TransferError, match="chunk 1: checksum mismatch"):
                    await move(sender, receiver, "bad", rows, FirstToken(1))
            finally:
                ucx.chunk_frame = original
            return await move(sender, receiver, "good", rows, FirstToken(2))  # same endpoint, still in step

    pages, first, _, _ = asyncio.run(main())
    assert torch.equal(bits(pages), bits(rows)) and first == FirstToken(2)


def test_cancelled_send_leaves_the_endpoint_usable() -> None:
    big = random_rows((4, 300, 576), seed=2)
    small = random_rows((2, 30, 64), seed=3)

    async def main():
        async with plane_pair("ucx") as (sender, receiver):
            gate = asyncio.Event()
            doomed = asyncio.ensure_future(sender.send("doomed", receiver.address, _stalled_blocks(big, gate),
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


def test_bad_address() -> None:
    async def main():
        sender = make_sender("ucx")
        try:
            with pytest.raises(TransferError, match="expected host:port"):
                await sender.send("r", "nonsense", prefill_blocks(random_rows((1, 2, 4))), resolved(FirstToken(1)))
        finally:
            await sender.close()

    asyncio.run(main())


def test_ucx_environment_defaults_only_fill_gaps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UCX_TLS", "rc,sm,self")
    monkeypatch.delenv("UCX_WARN_UNUSED_ENV_VARS", raising=False)
    load_ucxx()
    assert sys.modules["ucxx"] is not None
    assert (os.environ["UCX_TLS"], os.environ["UCX_WARN_UNUSED_ENV_VARS"]) == ("rc,sm,self", "n")
