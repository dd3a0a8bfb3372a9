"""The TCP plane's own behaviour: where it listens, a receiver restarted on its port, corrupt frames (what it shares
with the ucx plane is in test_connection_planes.py). Real sockets on loopback. L layers, N tokens, W row width."""

from __future__ import annotations

import asyncio
import socket

import pytest
import torch

from moemesh.transfer.base import FirstToken, RowBlock, TransferError
from moemesh.transfer.chunk import encode_rows
from moemesh.transfer.frames import chunk_frame
from moemesh.transfer.registry import make_receiver, make_sender
from tests.service.transfer.test_transfer_planes import bits, move, plane_pair, random_rows


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

