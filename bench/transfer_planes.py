"""Measure the KV data planes against a plain memory copy of the same bytes (for a benchmark command).

Throughput: one room of rows [L, N, W] sent and received whole (send start -> receive returns), GB/s.
Latency: one room of a single token [L, 1, W], the same way. Each is the median over `repeats` rooms,
after one warm-up room (connection set-up is not measured). Receiver and sender share this process.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moemesh.service.channel import mesh_channel
from moemesh.transfer.base import FirstToken, KvReceiver, KvSender, RowBlock
from moemesh.transfer.registry import make_receiver, make_sender


@dataclass(frozen=True)
class BenchResult:
    """One plane's numbers: `nbytes` per room; `throughput_s`/`latency_s` the median seconds per room."""

    plane: str
    nbytes: int
    throughput_s: float
    latency_s: float

    @property
    def gbps(self) -> float:
        return self.nbytes / self.throughput_s / 1e9

    def __str__(self) -> str:
        return (f"{self.plane:>8}: {self.gbps:8.2f} GB/s for {self.nbytes / 2**20:.1f} MiB, "
                f"{self.latency_s * 1e6:9.1f} us for one token")


def bench_memcpy(rows: torch.Tensor, repeats: int = 5) -> BenchResult:
    """The floor: copying rows [L, N, W] into preallocated pages on the same device."""
    pages = torch.empty_like(rows)
    one, one_pages = rows[:, :1].clone(), torch.empty_like(rows[:, :1])

    def timed(src: torch.Tensor, dst: torch.Tensor) -> float:
        t0 = time.perf_counter()
        dst.copy_(src)
        if dst.is_cuda:
            torch.cuda.synchronize(dst.device)
        return time.perf_counter() - t0

    timed(rows, pages)
    return BenchResult("memcpy", rows.numel() * rows.element_size(),
                       statistics.median(timed(rows, pages) for _ in range(repeats)),
                       statistics.median(timed(one, one_pages) for _ in range(repeats)))


async def _blocks(rows: torch.Tensor) -> AsyncIterator[RowBlock]:
    yield RowBlock(0, rows)


async def _first() -> FirstToken:
    return FirstToken(0)


# Opens a room at the control plane before its data moves: (room_id, num_tokens) -> None.
RoomOpener = Callable[[str, int], Awaitable[None]]


async def _room(sender: KvSender, receiver: KvReceiver, rows: torch.Tensor, pages: torch.Tensor,
                open_room: RoomOpener | None = None) -> float:
    def write(token_start: int, block: torch.Tensor) -> None:
        pages[:, token_start:token_start + block.shape[1]].copy_(block)

    room = uuid.uuid4().hex
    if open_room is not None:
        await open_room(room, rows.shape[1])  # the rendezvous is the control plane's cost, not the data's
    t0 = time.perf_counter()
    recv = asyncio.ensure_future(receiver.receive(room, rows.shape[1], write, 60.0))
    await sender.send(room, receiver.address, _blocks(rows), _first())
    await recv
    return time.perf_counter() - t0


async def bench_plane(plane: str, rows: torch.Tensor, repeats: int = 5, sender_kw: dict[str, Any] | None = None,
                      receiver_kw: dict[str, Any] | None = None, open_room: RoomOpener | None = None
                      ) -> BenchResult:
    """Move rows [L, N, W] (float32/bfloat16/float16) through `plane` in this process and time it."""
    receiver = make_receiver(plane, **(receiver_kw or {}))
    sender = make_sender(plane, **(sender_kw or {}))
    await receiver.start()
    try:
        pages = torch.empty_like(rows)
        one = rows[:, :1].contiguous()
        await _room(sender, receiver, rows, pages, open_room)  # warm-up: connect, first allocations
        throughput = [await _room(sender, receiver, rows, pages, open_room) for _ in range(repeats)]
        latency = [await _room(sender, receiver, one, pages[:, :1], open_room) for _ in range(repeats)]
    finally:
        await sender.close()
        await receiver.close()
    return BenchResult(plane, rows.numel() * rows.element_size(), statistics.median(throughput),
                       statistics.median(latency))


async def bench(rows: torch.Tensor, planes: Sequence[str] = ("inproc", "ucx"), relay_target: str | None = None,
                repeats: int = 5) -> list[BenchResult]:
    """memcpy, then each plane; "relay" is measured only given the target of a running kvtransfer."""
    results = [bench_memcpy(rows, repeats)]
    for plane in planes:
        if plane == "relay":
            if relay_target is None:
                continue
            kw: dict[str, Any] = {"target": relay_target}
            results.append(await bench_plane(plane, rows, repeats, sender_kw=kw, receiver_kw=kw,
                                             open_room=_relay_rooms(relay_target, rows)))
        else:
            results.append(await bench_plane(plane, rows, repeats))
    return results


def _relay_rooms(target: str, rows: torch.Tensor) -> RoomOpener:
    """Opens rooms at a real kvtransfer service: receiver registered, sender resolved, as the workers do."""

    from moemesh.transfer.chunk import dtype_to_proto
    from moemesh.v1 import common_pb2, kvtransfer_pb2, kvtransfer_pb2_grpc

    layout = common_pb2.KvLayout(model_fingerprint="bench", num_layers=rows.shape[0], page_size_tokens=1,
                                 kv_lora_rank=rows.shape[2], qk_rope_head_dim=0, dtype=dtype_to_proto(rows.dtype))
    stub: list[kvtransfer_pb2_grpc.KvTransferStub] = []

    async def open_room(room: str, num_tokens: int) -> None:
        if not stub:  # the channel must be made inside the running event loop
            stub.append(kvtransfer_pb2_grpc.KvTransferStub(mesh_channel(target)))
        v1 = common_pb2.PROTOCOL_VERSION_V1
        await stub[0].RegisterReceiver(kvtransfer_pb2.RegisterReceiverRequest(
            protocol_version=v1, room_id=room, layout=layout, data_plane=kvtransfer_pb2.DATA_PLANE_RELAY,
            num_tokens=num_tokens, lease_ms=60_000))
        await stub[0].ResolveReceiver(kvtransfer_pb2.ResolveReceiverRequest(
            protocol_version=v1, room_id=room, layout=layout, wait_ms=5_000, lease_ms=60_000))

    return open_room
