"""kvtransfer's room registry and relay on their own (no gRPC): state machine, leases, retention, buffers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import pytest

from moemesh.services.kvtransfer.errors import KvTransferError, Reason
from moemesh.services.kvtransfer.relay import Relay
from moemesh.services.kvtransfer.rooms import Receiver, RoomRegistry, RoomState, Side
from moemesh.transfer.layout import KvLayout
from moemesh.v1 import kvtransfer_pb2

LAYOUT = KvLayout("fp-1", 3, 16, 32, 16, "KV_DTYPE_BFLOAT16")
RECEIVER = Receiver(LAYOUT, data_plane="relay", address="", num_tokens=40, request_id="req-1")


def run(coro, timeout_s: float = 10):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Chunk:
    room_id: str
    data: bytes
    last: bool = False


async def _stream(chunks):
    for c in chunks:
        yield c


def test_states_match_the_proto_enum():
    for state in RoomState:
        assert kvtransfer_pb2.RoomState.Value(f"ROOM_STATE_{state.name}") == state


def test_receiver_first_then_sender_then_success():
    async def main():
        rooms = RoomRegistry()
        assert rooms.register_receiver("r", RECEIVER) is RoomState.WAITING_FOR_INPUT
        state, receiver = await rooms.resolve_receiver("r", LAYOUT, wait_ms=1000)
        assert (state, receiver) == (RoomState.TRANSFERRING, RECEIVER)
        assert rooms.report("r", RoomState.SUCCESS, bytes_moved=10, side=Side.RECEIVER) is RoomState.SUCCESS

    run(main())


def test_sender_first_waits_for_the_receiver():
    async def main():
        rooms = RoomRegistry()
        resolving = asyncio.create_task(rooms.resolve_receiver("r", LAYOUT, wait_ms=5000))
        await asyncio.sleep(0.01)
        assert rooms.status("r").state is RoomState.BOOTSTRAPPING
        assert rooms.register_receiver("r", RECEIVER) is RoomState.WAITING_FOR_INPUT
        assert await resolving == (RoomState.TRANSFERRING, RECEIVER)

    run(main())


def test_layout_mismatch_names_every_field_and_fails_the_room():
    async def main():
        rooms = RoomRegistry()
        rooms.register_receiver("r", RECEIVER)
        other = replace(LAYOUT, num_layers=4, dtype="KV_DTYPE_FLOAT32")
        with pytest.raises(KvTransferError) as ei:
            await rooms.resolve_receiver("r", other)
        assert ei.value.reason is Reason.INCOMPATIBLE
        assert "num_layers: sender 4, receiver 3" in str(ei.value)
        assert "dtype: sender 'KV_DTYPE_FLOAT32', receiver 'KV_DTYPE_BFLOAT16'" in str(ei.value)
        assert "model_fingerprint" not in str(ei.value)
        assert rooms.status("r").state is RoomState.FAILED

    run(main())


def test_only_the_receiver_succeeds_and_only_once_transferring():
    async def main():
        rooms = RoomRegistry()
        rooms.register_receiver("r", RECEIVER)
        with pytest.raises(KvTransferError, match="cannot succeed in state WAITING_FOR_INPUT"):
            rooms.report("r", RoomState.SUCCESS)
        await rooms.resolve_receiver("r", LAYOUT)
        with pytest.raises(KvTransferError, match="only the receiver"):
            rooms.report("r", RoomState.SUCCESS, side=Side.SENDER)
        with pytest.raises(KvTransferError, match="SUCCESS or FAILED"):
            rooms.report("r", RoomState.TRANSFERRING)
        assert rooms.report("r", RoomState.FAILED, "out of pages", side=Side.RECEIVER) is RoomState.FAILED
        assert rooms.status("r").error == "room 'r': the receiver reported failure: out of pages"

    run(main())


def test_lease_expiry_by_sweep_and_retention_then_forgotten():
    clock = FakeClock()
    rooms = RoomRegistry(default_lease_ms=1000, retention_s=5, clock=clock)
    rooms.register_receiver("r", RECEIVER)
    clock.now += 0.999
    rooms.sweep()
    assert rooms.status("r").state is RoomState.WAITING_FOR_INPUT
    clock.now += 0.002
    rooms.sweep()
    status = rooms.status("r")
    assert status.state is RoomState.FAILED
    assert "timed out in state WAITING_FOR_INPUT after 1001 ms (lease 1000 ms)" in status.error
    clock.now += 4.9
    rooms.sweep()
    assert "r" in rooms
    clock.now += 0.2
    rooms.sweep()
    assert "r" not in rooms
    with pytest.raises(KvTransferError) as ei:
        rooms.status("r")
    assert ei.value.reason is Reason.NOT_FOUND


def test_leases_are_capped_and_defaulted():
    clock = FakeClock()
    rooms = RoomRegistry(default_lease_ms=1000, max_lease_ms=2000, clock=clock)
    rooms.register_receiver("default", RECEIVER)
    rooms.register_receiver("capped", RECEIVER, lease_ms=60_000)
    clock.now += 1.5
    rooms.sweep()
    assert rooms.status("default").state is RoomState.FAILED
    assert rooms.status("capped").state is RoomState.WAITING_FOR_INPUT
    clock.now += 1.0
    rooms.sweep()
    assert rooms.status("capped").state is RoomState.FAILED


def test_room_cap_evicts_ended_rooms_before_refusing():
    rooms = RoomRegistry(max_rooms=2)
    rooms.register_receiver("a", RECEIVER)
    rooms.register_receiver("b", RECEIVER)
    with pytest.raises(KvTransferError) as ei:
        rooms.register_receiver("c", RECEIVER)
    assert ei.value.reason is Reason.EXHAUSTED
    rooms.report("a", RoomState.FAILED, "gone")
    rooms.register_receiver("c", RECEIVER)
    assert "a" not in rooms and "c" in rooms


def test_duplicate_receiver_is_a_conflict():
    rooms = RoomRegistry()
    rooms.register_receiver("r", RECEIVER)
    with pytest.raises(KvTransferError, match="already exists") as ei:
        rooms.register_receiver("r", RECEIVER)
    assert ei.value.reason is Reason.CONFLICT


def test_close_fails_live_rooms_and_refuses_new_ones():
    async def main():
        rooms = RoomRegistry()
        resolving = asyncio.create_task(rooms.resolve_receiver("r", LAYOUT, wait_ms=5000))
        await asyncio.sleep(0.01)
        rooms.close()
        with pytest.raises(KvTransferError) as ei:
            await resolving
        assert ei.value.reason is Reason.SHUTTING_DOWN
        with pytest.raises(KvTransferError, match="shutting down"):
            rooms.register_receiver("s", RECEIVER)

    run(main())


def test_watch_sees_every_change_even_when_read_late():
    async def main():
        rooms = RoomRegistry()
        rooms.register_receiver("r", RECEIVER)
        watch = rooms.watch("r")
        first = await anext(watch)
        await rooms.resolve_receiver("r", LAYOUT)
        rooms.report("r", RoomState.SUCCESS)
        rest = [s.state async for s in watch]
        assert [first.state, *rest] == [RoomState.WAITING_FOR_INPUT, RoomState.TRANSFERRING, RoomState.SUCCESS]

    run(main())


def test_relay_backpressure_waits_for_the_puller():
    async def main():
        rooms = RoomRegistry()
        relay = Relay(rooms, queue_chunks=2, room_max_bytes=1000, total_max_bytes=10_000)
        rooms.register_receiver("r", RECEIVER)
        await rooms.resolve_receiver("r", LAYOUT)
        chunks = [Chunk("r", bytes([i]) * 100, last=(i == 4)) for i in range(5)]
        pushing = asyncio.create_task(relay.push(_stream(chunks)))
        await asyncio.sleep(0.05)
        assert not pushing.done() and relay.buffered_bytes == 200  # two chunks in, the third waits
        pulled = [c async for c in relay.pull("r")]
        assert pulled == chunks
        assert await pushing == (5, 500)
        assert relay.buffered_bytes == 0

    run(main())


def test_relay_caps_bytes_per_room_and_overall():
    async def main():
        rooms = RoomRegistry()
        relay = Relay(rooms, queue_chunks=8, room_max_bytes=100, total_max_bytes=150)
        for room in ("a", "b", "c"):
            rooms.register_receiver(room, RECEIVER)
            await rooms.resolve_receiver(room, LAYOUT)
        with pytest.raises(KvTransferError, match="exceeds the relay's per-room buffer") as ei:
            await relay.push(_stream([Chunk("a", b"x" * 101)]))
        assert ei.value.reason is Reason.EXHAUSTED
        assert rooms.status("a").state is RoomState.FAILED
        assert await relay.push(_stream([Chunk("b", b"x" * 100)])) == (1, 100)
        with pytest.raises(KvTransferError, match="exceed its limit of 150 bytes") as ei:
            await relay.push(_stream([Chunk("c", b"x" * 60)]))
        assert ei.value.reason is Reason.EXHAUSTED
        rooms.report("b", RoomState.FAILED, "done with it")
        assert relay.buffered_bytes == 0  # an ended room's buffer is freed

    run(main())
