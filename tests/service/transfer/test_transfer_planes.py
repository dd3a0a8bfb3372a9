"""Every KV data plane moves rows bit-exactly with the first token, times out, cancels, and fails fast on a
dead peer. The relay runs against `RelayDouble`, a minimal stand-in for kvtransfer's relay RPCs.
L layers, N tokens, W row width."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import torch

from moemesh.service.channel import CHANNEL_OPTIONS
from moemesh.transfer.base import FirstToken, KvReceiver, KvSender, RowBlock, TransferError
from moemesh.transfer.planes import PLANES
from moemesh.transfer.registry import make_receiver, make_sender
from moemesh.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc

# Every plane; ucx is skipped only where ucxx is not installed at all (a broken install fails loudly).
ALL = [p if p != "ucx" else pytest.param(p, marks=pytest.mark.skipif(
    importlib.util.find_spec("ucxx") is None, reason="ucxx-cu12 not installed")) for p in PLANES]
BUFFERING = [p for p in ALL if p != "relay"]  # the relay buffers early chunks itself
SHAPE = (4, 300, 576)  # [L, N, W]
CHUNK_BYTES = 256 * 2**10  # 28 tokens of SHAPE per chunk: 11 row chunks and the closing one


class RelayDouble(kvtransfer_pb2_grpc.KvTransferServicer):
    """TEST DOUBLE of kvtransfer's relay (not the service): one unbounded queue of chunks per room."""

    def __init__(self) -> None:
        self.rooms: defaultdict[str, asyncio.Queue[kvtransfer_pb2.KvChunk]] = defaultdict(asyncio.Queue)

    async def PushChunks(self, request_iterator: Any, context: Any) -> kvtransfer_pb2.PushChunksResponse:
        n = nbytes = 0
        async for chunk in request_iterator:
            self.rooms[chunk.room_id].put_nowait(chunk)
            n += 1
            nbytes += len(chunk.data)
        return kvtransfer_pb2.PushChunksResponse(num_chunks=n, bytes=nbytes)

    async def PullChunks(self, request: Any, context: Any) -> AsyncIterator[kvtransfer_pb2.KvChunk]:
        queue = self.rooms[request.room_id]
        while True:
            chunk = await queue.get()
            yield chunk
            if chunk.last:
                return


@contextlib.asynccontextmanager
async def relay_server() -> AsyncIterator[str]:
    """A real grpc.aio server on 127.0.0.1 serving RelayDouble; yields its "host:port"."""
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    kvtransfer_pb2_grpc.add_KvTransferServicer_to_server(RelayDouble(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@contextlib.asynccontextmanager
async def plane_pair(plane: str, **receiver_kw: Any) -> AsyncIterator[tuple[KvSender, KvReceiver]]:
    """A started receiver of `plane` and a sender for it (chunks of CHUNK_BYTES), closed on exit."""
    async with contextlib.AsyncExitStack() as stack:
        kw: dict[str, Any] = {}
        if plane == "relay":
            kw["target"] = await stack.enter_async_context(relay_server())
        receiver = make_receiver(plane, **kw, **receiver_kw)
        sender = make_sender(plane, max_chunk_bytes=CHUNK_BYTES, **kw)
        stack.push_async_callback(receiver.close)
        stack.push_async_callback(sender.close)
        await receiver.start()
        yield sender, receiver


def random_rows(shape: tuple[int, int, int] = SHAPE, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


async def prefill_blocks(rows: torch.Tensor, block_tokens: int = 128) -> AsyncIterator[RowBlock]:
    """rows [L, N, W] as chunked prefill produces them: consecutive blocks, a pause between."""
    for start in range(0, rows.shape[1], block_tokens):
        yield RowBlock(start, rows[:, start:start + block_tokens])
        await asyncio.sleep(0)


async def resolved(first: FirstToken) -> FirstToken:
    return first


async def move(sender: KvSender, receiver: KvReceiver, room: str, rows: torch.Tensor, first: FirstToken,
               receive_first: bool = True, timeout_s: float = 10.0) -> tuple[torch.Tensor, FirstToken, int, int]:
    """Send rows [L, N, W] for `room` and receive them into fresh pages; returns (pages, first, sent, received)."""
    pages = torch.full_like(rows, float("nan"))

    def write(token_start: int, block: torch.Tensor) -> None:
        pages[:, token_start:token_start + block.shape[1]] = block

    async def recv() -> tuple[FirstToken, int]:
        return await receiver.receive(room, rows.shape[1], write, timeout_s)

    if receive_first:
        recv_task = asyncio.ensure_future(recv())
        await asyncio.sleep(0)
        sent = await sender.send(room, receiver.address, prefill_blocks(rows), resolved(first))
        got_first, received = await recv_task
    else:  # every chunk arrives before the receive: the receiver must buffer them
        sent = await sender.send(room, receiver.address, prefill_blocks(rows), resolved(first))
        await asyncio.sleep(0.05)
        got_first, received = await recv()
    return pages, got_first, sent, received


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("plane", ALL)
def test_moves_rows_bit_exactly_with_first_token(plane: str) -> None:
    rows = random_rows()
    first = FirstToken(123, -0.5, ((123, -0.5), (9, -1.75)))

    async def main():
        async with plane_pair(plane) as (sender, receiver):
            return await move(sender, receiver, "room-1", rows, first)

    pages, got_first, sent, received = asyncio.run(main())
    assert torch.equal(bits(pages), bits(rows))
    assert got_first == first
    assert sent == received == rows.numel() * 4


@pytest.mark.parametrize("plane", BUFFERING)
def test_chunks_arriving_before_receive_are_buffered(plane: str) -> None:
    rows = random_rows(dtype=torch.bfloat16, seed=1)

    async def main():
        async with plane_pair(plane) as (sender, receiver):
            return await move(sender, receiver, "early", rows, FirstToken(4), receive_first=False)

    pages, got_first, _, _ = asyncio.run(main())
    assert torch.equal(bits(pages), bits(rows)) and got_first == FirstToken(4)


@pytest.mark.parametrize("plane", ALL)
def test_concurrent_rooms(plane: str) -> None:
    rooms = {f"room-{i}": random_rows((4, 60 + 40 * i, 576), torch.float16, seed=i) for i in range(4)}

    async def main():
        async with plane_pair(plane) as (sender, receiver):
            results = await asyncio.gather(*(move(sender, receiver, room, rows, FirstToken(i))
                                             for i, (room, rows) in enumerate(rooms.items())))
            if plane in ("ucx", "tcp"):
                assert len(sender._peers) == 1  # every room shared one endpoint
            return results

    for i, (rows, (pages, first, _, _)) in enumerate(zip(rooms.values(), asyncio.run(main()), strict=True)):
        assert torch.equal(bits(pages), bits(rows)) and first == FirstToken(i)


@pytest.mark.parametrize("plane", ALL)
def test_receive_times_out(plane: str) -> None:
    async def main():
        async with plane_pair(plane) as (_, receiver):
            t0 = time.monotonic()
            with pytest.raises(TransferError, match=r"timed out after 0\.3 s"):
                await receiver.receive("nobody-sends", 10, lambda s, r: None, 0.3)
            return time.monotonic() - t0

    assert asyncio.run(main()) < 2.0


@pytest.mark.parametrize("plane", ALL)
def test_cancel_stops_a_receive(plane: str) -> None:
    async def main():
        async with plane_pair(plane) as (_, receiver):
            task = asyncio.ensure_future(receiver.receive("doomed", 10, lambda s, r: None, 30.0))
            await asyncio.sleep(0.05)
            await receiver.cancel("doomed")
            with pytest.raises(TransferError, match="cancelled"):
                await asyncio.wait_for(task, 2.0)

    asyncio.run(main())


@pytest.mark.parametrize("plane", ALL)
def test_close_fails_pending_receives(plane: str) -> None:
    async def main():
        async with plane_pair(plane) as (_, receiver):
            task = asyncio.ensure_future(receiver.receive("pending", 10, lambda s, r: None, 30.0))
            await asyncio.sleep(0.05)
            await receiver.close()
            with pytest.raises(TransferError, match="closed"):
                await asyncio.wait_for(task, 2.0)

    asyncio.run(main())


@pytest.mark.parametrize("plane", ALL)
def test_send_to_a_dead_address_fails_fast(plane: str) -> None:
    port = closed_port()

    async def main():
        # UCX may wait its connect timeout out rather than see the refusal: a short one keeps the test short.
        kw = {"relay": {"target": f"127.0.0.1:{port}"}, "ucx": {"connect_timeout_s": 1.0}}.get(plane, {})
        sender = make_sender(plane, **kw)
        address = {"inproc": "inproc://gone", "relay": ""}.get(plane, f"127.0.0.1:{port}")
        t0 = time.monotonic()
        try:
            with pytest.raises(TransferError):
                await sender.send("room", address, prefill_blocks(random_rows((2, 8, 16))), resolved(FirstToken(1)))
        finally:
            await sender.close()
        return time.monotonic() - t0

    assert asyncio.run(main()) < 8.0


def test_relay_receive_from_a_dead_relay_fails_fast() -> None:
    async def main():
        receiver = make_receiver("relay", target=f"127.0.0.1:{closed_port()}")
        await receiver.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(TransferError, match=r"relay pull from .* failed: UNAVAILABLE"):
                await receiver.receive("room", 10, lambda s, r: None, 20.0)
        finally:
            await receiver.close()
        return time.monotonic() - t0

    assert asyncio.run(main()) < 8.0


def test_registry() -> None:
    assert PLANES.names() == ("ucx", "relay", "inproc", "tcp")
    with pytest.raises(ValueError, match="unknown KV data plane 'rdma'; choose one of ucx, relay, inproc, tcp"):
        make_receiver("rdma")
    with pytest.raises(ValueError, match="choose one of"):
        make_sender("")
    # Each plane's registration names classes of that plane (the wire carries `plane` as the name).
    for plane in ("relay", "inproc", "tcp"):
        receiver = make_receiver(plane, **({"target": "127.0.0.1:1"} if plane == "relay" else {}))
        sender = make_sender(plane, **({"target": "127.0.0.1:1"} if plane == "relay" else {}))
        assert (receiver.plane, isinstance(receiver, KvReceiver), isinstance(sender, KvSender)) == (plane, True, True)


def test_inproc_corrupted_chunk_fails_the_room() -> None:
    from moemesh.transfer.chunk import encode_rows

    async def main():
        async with plane_pair("inproc") as (_, receiver):
            msg = encode_rows("bad", 0, RowBlock(0, random_rows((2, 4, 8)))).to_message()
            msg.checksum_crc32 ^= 1
            receiver.deliver(msg.SerializeToString())
            with pytest.raises(TransferError, match="checksum mismatch"):
                await receiver.receive("bad", 4, lambda s, r: None, 1.0)

    asyncio.run(main())


def test_bench_runs() -> None:
    from moemesh.bench.transfer_planes import bench

    results = asyncio.run(bench(random_rows((2, 16, 8)), planes=("inproc", "relay"), repeats=1))
    assert [r.plane for r in results] == ["memcpy", "inproc"]  # no relay target: relay skipped
    assert all(r.nbytes == 2 * 16 * 8 * 4 and r.gbps > 0 and r.latency_s > 0 for r in results)
