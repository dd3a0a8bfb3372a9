"""The TCP plane's own behaviour: connection reuse and reconnection, peers going away mid-room, corrupt frames and
chunks, where it listens. Real sockets on loopback. L layers, N tokens, W row width."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest
import torch

from moemesh.transfer.base import FirstToken, RowBlock, TransferError
from moemesh.transfer.chunk import encode_rows
from moemesh.transfer.frames import chunk_frame
from moemesh.transfer.registry import make_receiver, make_sender
from tests.service.transfer.test_transfer_planes import bits, move, plane_pair, prefill_blocks, random_rows, resolved


async def _stalled_blocks(rows: torch.Tensor, gate: asyncio.Event):
    """The first half of rows [L, N, W], then a wait on `gate`, then the rest."""
    half = rows.shape[1] // 2
    yield RowBlock(0, rows[:, :half])
    await gate.wait()
    yield RowBlock(half, rows[:, half:])


def test_listens_on_loopback_by_default_and_advertises_the_name_given() -> None:
    async def main():
        receiver = make_receiver("tcp")
        named = make_receiver("tcp", advertise_host="decode-0.mesh")
        await receiver.start()
        await named.start()
        try:
            bound = [s.getsockname()[0] for s in receiver._server.sockets]
            return bound, receiver.address, named.address, named.port
        finally:
            await receiver.close()
            await named.close()

    bound, address, named, port = asyncio.run(main())
    assert bound == ["127.0.0.1"]
    assert address.startswith("127.0.0.1:") and int(address.rsplit(":", 1)[1]) > 0
    assert named == f"decode-0.mesh:{port}"


def test_a_port_in_use_fails_the_start_with_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def main():
            receiver = make_receiver("tcp", port=port)
            with pytest.raises(TransferError, match=f"cannot listen on 127.0.0.1:{port}"):
                await receiver.start()
            await receiver.close()

        asyncio.run(main())


def test_connection_is_reused_and_reconnected_after_a_failure() -> None:
    rows = random_rows((2, 50, 64))

    async def main():
        async with plane_pair("tcp") as (sender, receiver):
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


def test_a_restarted_receiver_on_the_same_port_gets_a_new_connection() -> None:
    rows = random_rows((2, 20, 32))

    async def main():
        sender = make_sender("tcp")
        first = make_receiver("tcp")
        await first.start()
        try:
            await move(sender, first, "a", rows, FirstToken(1))
            port = first.port
            await first.close()
            await asyncio.sleep(0.1)  # the close reaches the sender's side of the connection
            second = make_receiver("tcp", port=port)
            await second.start()
            try:
                return await move(sender, second, "b", rows, FirstToken(2))
            finally:
                await second.close()
        finally:
            await sender.close()

    pages, first, _, _ = asyncio.run(main())
    assert torch.equal(bits(pages), bits(rows)) and first == FirstToken(2)


def test_receiver_gone_mid_room_fails_the_sender() -> None:
    rows = random_rows((2, 64, 64))

    async def main():
        async with plane_pair("tcp") as (sender, receiver):
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
            with pytest.raises(TransferError, match=r"the TCP receiver at .* closed the connection"):
                await asyncio.wait_for(send, 10.0)
            return time.monotonic() - t0

    assert asyncio.run(main()) < 5.0


# "close": the sender closes its connection, or its process dies (a FIN either way); "lost": the connection is
# reset (an RST, as when the peer's host drops it).
@pytest.mark.parametrize(("how", "why"), [("close", "the sender closed the connection"),
                                          ("lost", "the sender's connection closed")])
def test_sender_gone_mid_room_fails_the_receive_at_once(how: str, why: str) -> None:
    rows = random_rows((2, 64, 64))

    async def main():
        async with plane_pair("tcp") as (sender, receiver):
            gate = asyncio.Event()
            send = asyncio.ensure_future(sender.send("r", receiver.address, _stalled_blocks(rows, gate),
                                                     resolved(FirstToken(1))))
            recv = asyncio.ensure_future(receiver.receive("r", 64, lambda s, r: None, 20.0))
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            if how == "close":
                await sender.close()
            else:
                sock = sender._peers[receiver.address].writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sender._peers[receiver.address].abort()
            with pytest.raises(TransferError, match=f"{why} before the last chunk"):
                await asyncio.wait_for(recv, 5.0)
            send.cancel()
            return time.monotonic() - t0

    assert asyncio.run(main()) < 3.0


def test_corrupt_chunk_fails_its_room_only() -> None:
    from moemesh.transfer import tcp

    rows = random_rows(seed=5)  # several row chunks at the test's chunk size; chunk 1 carries rows

    async def main(monkeypatch: pytest.MonkeyPatch):
        async with plane_pair("tcp") as (sender, receiver):
            original = tcp.chunk_frame

            def corrupting_frame(chunk):
                if chunk.header.room_id == "bad" and chunk.header.chunk_index == 1:
                    chunk.header.checksum_crc32 ^= 1
                return original(chunk)

            monkeypatch.setattr(tcp, "chunk_frame", corrupting_frame)
            with pytest.raises(TransferError, match="chunk 1: checksum mismatch"):
                await move(sender, receiver, "bad", rows, FirstToken(1))
            monkeypatch.undo()
            return await move(sender, receiver, "good", rows, FirstToken(2))  # same connection, still in step

    with pytest.MonkeyPatch.context() as mp:
        pages, first, _, _ = asyncio.run(main(mp))
    assert torch.equal(bits(pages), bits(rows)) and first == FirstToken(2)


@pytest.mark.parametrize(("garbage", "why"), [(b"HTTP/1.1 200 OK\r\n\r\n" + bytes(8), "not a moemesh KV frame"),
                                              (None, "announces a")])
def test_a_corrupt_frame_closes_that_connection_only(garbage: bytes | None, why: str) -> None:
    rows = random_rows((2, 16, 32), seed=7)

    async def main():
        async with plane_pair("tcp") as (sender, receiver):
            reader, writer = await asyncio.open_connection("127.0.0.1", receiver.port)
            # A real chunk starts a room on this connection, then the frame of the next one is wrong.
            writer.write(chunk_frame(encode_rows("victim", 0, RowBlock(0, rows[:, :8]))))
            writer.write(encode_rows("victim", 0, RowBlock(0, rows[:, :8])).data.tobytes())
            bad = garbage
            if bad is None:  # a well-formed frame that announces a 4 GiB chunk
                frame = chunk_frame(encode_rows("victim", 1, RowBlock(8, rows[:, 8:])))
                frame[12:20] = (2**32).to_bytes(8, "little")
                bad = bytes(frame)
            writer.write(bad)
            recv = receiver.receive("victim", 16, lambda s, r: None, 10.0)
            with pytest.raises(TransferError, match=f"corrupt frame from the sender.*{why}"):
                await asyncio.wait_for(recv, 5.0)
            try:  # the receiver dropped the connection (reset: it left unread bytes behind)
                assert await asyncio.wait_for(reader.read(), 5.0) == b""
            except ConnectionResetError:
                pass
            writer.close()
            return await move(sender, receiver, "good", rows, FirstToken(3))

    pages, first, _, _ = asyncio.run(main())
    assert torch.equal(bits(pages), bits(rows)) and first == FirstToken(3)


def test_bad_address() -> None:
    async def main():
        sender = make_sender("tcp")
        try:
            with pytest.raises(TransferError, match="bad TCP address 'nonsense': expected host:port"):
                await sender.send("r", "nonsense", prefill_blocks(random_rows((1, 2, 4))), resolved(FirstToken(1)))
        finally:
            await sender.close()

    asyncio.run(main())
