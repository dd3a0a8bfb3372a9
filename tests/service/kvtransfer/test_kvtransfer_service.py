"""kvtransfer over real gRPC: a grpc.aio server on 127.0.0.1 (port 0) and real client stubs."""

from __future__ import annotations

import asyncio
import contextlib
import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moemesh.service.channel import CHANNEL_OPTIONS
from moemesh.services.kvtransfer.config import KvTransferConfig
from moemesh.services.kvtransfer.service import KvTransferService
from moemesh.services.kvtransfer.servicer import SIDE_METADATA_KEY
from moemesh.v1 import common_pb2, kvtransfer_pb2, kvtransfer_pb2_grpc

pb = kvtransfer_pb2
V1 = common_pb2.PROTOCOL_VERSION_V1
RPC_TIMEOUT_S = 5
LAYOUT = common_pb2.KvLayout(model_fingerprint="fp-1", num_layers=3, page_size_tokens=16, kv_lora_rank=32,
                             qk_rope_head_dim=16, dtype=common_pb2.KV_DTYPE_BFLOAT16)
# Each field's changed value, and how the mismatch message shows it on the sender's side.
CHANGED = {
    "model_fingerprint": ("fp-2", "'fp-2'"),
    "num_layers": (4, "4"),
    "page_size_tokens": (32, "32"),
    "kv_lora_rank": (64, "64"),
    "qk_rope_head_dim": (8, "8"),
    "dtype": (common_pb2.KV_DTYPE_FLOAT32, "'KV_DTYPE_FLOAT32'"),
}
ORIGINAL_SHOWN = {"model_fingerprint": "'fp-1'", "num_layers": "3", "page_size_tokens": "16",
                  "kv_lora_rank": "32", "qk_rope_head_dim": "16", "dtype": "'KV_DTYPE_BFLOAT16'"}


def run(coro, timeout_s: float = 15):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


@contextlib.asynccontextmanager
async def kvtransfer(**overrides):
    """A started service and a stub on a channel to it; stopped on exit."""
    cfg = KvTransferConfig(**{"port": 0, "sweep_interval_s": 0.05, "drain_s": 0.0, "shutdown_grace_s": 1.0,
                              **overrides})
    svc = KvTransferService(cfg)
    await svc.start()
    channel = grpc.aio.insecure_channel(svc.address, options=CHANNEL_OPTIONS)
    try:
        yield svc, kvtransfer_pb2_grpc.KvTransferStub(channel), channel
    finally:
        await channel.close()
        await svc.stop()


def register(room: str, *, layout=LAYOUT, lease_ms: int = 0, plane=pb.DATA_PLANE_RELAY, version=V1):
    return pb.RegisterReceiverRequest(protocol_version=version, room_id=room, request_id=f"req-{room}",
                                      layout=layout, data_plane=plane, data_plane_address="10.0.0.7:4000",
                                      num_tokens=40, lease_ms=lease_ms)


def resolve(room: str, *, layout=LAYOUT, wait_ms: int = 2000, lease_ms: int = 0, version=V1):
    return pb.ResolveReceiverRequest(protocol_version=version, room_id=room, layout=layout, wait_ms=wait_ms,
                                     lease_ms=lease_ms)


async def rpc_error(awaitable) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await awaitable
    return ei.value


async def states_of(stub, room: str) -> list[tuple[int, str]]:
    return [(s.state, s.error) async for s in stub.WatchRoom(pb.WatchRoomRequest(room_id=room),
                                                               timeout=RPC_TIMEOUT_S)]


async def watching(stub, room: str) -> asyncio.Task[list[int]]:
    """A watch whose first status has arrived (so none is missed), collecting every state till the end."""
    call = stub.WatchRoom(pb.WatchRoomRequest(room_id=room), timeout=RPC_TIMEOUT_S)
    first = await call.read()

    async def rest() -> list[int]:
        states = [first.state]
        while (status := await call.read()) is not grpc.aio.EOF:
            states.append(status.state)
        return states

    return asyncio.create_task(rest())


async def until_known(svc: KvTransferService, room: str) -> None:
    while room not in svc.rooms:
        await asyncio.sleep(0.005)


async def until_pulling(svc: KvTransferService, room: str) -> None:
    while not (room in svc.relay._channels and svc.relay._channels[room].pulling):
        await asyncio.sleep(0.005)


def make_chunks(room: str, n: int, size: int) -> list[pb.KvChunk]:
    return [pb.KvChunk(room_id=room, chunk_index=i, token_start=8 * i, num_tokens=8, num_layers=3, row_width=48,
                       dtype=common_pb2.KV_DTYPE_BFLOAT16, data=os.urandom(size), checksum_crc32=i,
                       last=(i == n - 1), first_token_id=7 if i == n - 1 else 0, num_chunks=n if i == n - 1 else 0)
            for i in range(n)]


async def push_all(stub, chunks) -> pb.PushChunksResponse:
    call = stub.PushChunks(timeout=RPC_TIMEOUT_S)
    for c in chunks:
        await call.write(c)
    await call.done_writing()
    return await call


async def pull_all(stub, room: str) -> list[pb.KvChunk]:
    return [c async for c in stub.PullChunks(pb.PullChunksRequest(room_id=room), timeout=RPC_TIMEOUT_S)]


# -- the state machine ---------------------------------------------------------------------------


def test_receiver_first_full_sequence():
    async def main():
        async with kvtransfer() as (_, stub, _):
            r = await stub.RegisterReceiver(register("r1"), timeout=RPC_TIMEOUT_S)
            assert r.state == pb.ROOM_STATE_WAITING_FOR_INPUT
            watch = await watching(stub, "r1")
            res = await stub.ResolveReceiver(resolve("r1"), timeout=RPC_TIMEOUT_S)
            assert (res.state, res.data_plane, res.data_plane_address, res.num_tokens) == (
                pb.ROOM_STATE_TRANSFERRING, pb.DATA_PLANE_RELAY, "10.0.0.7:4000", 40)
            rep = await stub.ReportTransfer(pb.ReportTransferRequest(room_id="r1", state=pb.ROOM_STATE_SUCCESS,
                                                                     bytes=123), timeout=RPC_TIMEOUT_S)
            assert rep.state == pb.ROOM_STATE_SUCCESS
            assert await watch == [
                pb.ROOM_STATE_WAITING_FOR_INPUT, pb.ROOM_STATE_TRANSFERRING, pb.ROOM_STATE_SUCCESS]

    run(main())


def test_the_plane_travels_by_name_and_as_the_enum_older_peers_read(monkeypatch: pytest.MonkeyPatch):
    from moemesh.transfer.planes import PLANES

    monkeypatch.setattr(PLANES, "_entries", dict(PLANES._entries))  # undone after the test
    PLANES.register("shm", "moemesh.transfer.shm", receiver="ShmReceiver", sender="ShmSender", cross_process=True)
    sent = {  # room: (data_plane, data_plane_name) registered -> the same pair resolved
        "old": ((pb.DATA_PLANE_RELAY, ""), (pb.DATA_PLANE_RELAY, "relay")),  # a receiver that predates names
        "both": ((pb.DATA_PLANE_UCX, "ucx"), (pb.DATA_PLANE_UCX, "ucx")),
        "name": ((pb.DATA_PLANE_UNSPECIFIED, "inproc"), (pb.DATA_PLANE_INPROC, "inproc")),
        "new": ((pb.DATA_PLANE_UNSPECIFIED, "shm"), (pb.DATA_PLANE_UNSPECIFIED, "shm")),  # no enum value
    }

    async def main():
        async with kvtransfer() as (_, stub, _):
            for room, ((plane, name), resolved) in sent.items():
                req = register(room, plane=plane)
                req.data_plane_name = name
                await stub.RegisterReceiver(req, timeout=RPC_TIMEOUT_S)
                res = await stub.ResolveReceiver(resolve(room), timeout=RPC_TIMEOUT_S)
                assert (res.data_plane, res.data_plane_name) == resolved, room
            for plane, name, words in ((pb.DATA_PLANE_RELAY, "rdma", "data_plane_name: unknown KV data plane 'rdma'"),
                                       (pb.DATA_PLANE_UCX, "relay", "name different planes")):
                req = register("refused", plane=plane)
                req.data_plane_name = name
                err = await rpc_error(stub.RegisterReceiver(req, timeout=RPC_TIMEOUT_S))
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.details(), err.details()

    run(main())


def test_sender_first_full_sequence():
    async def main():
        async with kvtransfer() as (svc, stub, _):
            resolving = asyncio.ensure_future(stub.ResolveReceiver(resolve("r1", wait_ms=5000), timeout=RPC_TIMEOUT_S))
            await until_known(svc, "r1")
            watch = await watching(stub, "r1")
            r = await stub.RegisterReceiver(register("r1"), timeout=RPC_TIMEOUT_S)
            assert r.state == pb.ROOM_STATE_WAITING_FOR_INPUT
            res = await resolving
            assert (res.state, res.data_plane_address, res.num_tokens) == (pb.ROOM_STATE_TRANSFERRING,
                                                                             "10.0.0.7:4000", 40)
            await stub.ReportTransfer(pb.ReportTransferRequest(room_id="r1", state=pb.ROOM_STATE_SUCCESS),
                                      timeout=RPC_TIMEOUT_S)
            assert await watch == [
                pb.ROOM_STATE_BOOTSTRAPPING, pb.ROOM_STATE_WAITING_FOR_INPUT, pb.ROOM_STATE_TRANSFERRING,
                pb.ROOM_STATE_SUCCESS]

    run(main())


@pytest.mark.parametrize("field", list(CHANGED))
def test_layout_mismatch_refused_before_any_chunk(field):
    async def main():
        async with kvtransfer() as (svc, stub, _):
            value, shown = CHANGED[field]
            other = common_pb2.KvLayout()
            other.CopyFrom(LAYOUT)
            setattr(other, field, value)
            expected = f"{field}: sender {shown}, receiver {ORIGINAL_SHOWN[field]}"

            # Receiver first: the resolve is refused.
            await stub.RegisterReceiver(register("a"), timeout=RPC_TIMEOUT_S)
            err = await rpc_error(stub.ResolveReceiver(resolve("a", layout=other), timeout=RPC_TIMEOUT_S))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert expected in err.details()
            assert err.details().count(", receiver ") == 1  # only the differing field is named
            [(state, error)] = await states_of(stub, "a")
            assert state == pb.ROOM_STATE_FAILED and expected in error
            err = await rpc_error(push_all(stub, make_chunks("a", 1, 16)))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert svc.relay.buffered_bytes == 0

            # Sender first: the registration is refused, and so is the waiting resolve.
            resolving = asyncio.ensure_future(stub.ResolveReceiver(resolve("b", layout=other, wait_ms=5000),
                                                                   timeout=RPC_TIMEOUT_S))
            await until_known(svc, "b")
            err = await rpc_error(stub.RegisterReceiver(register("b"), timeout=RPC_TIMEOUT_S))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and expected in err.details()
            err = await rpc_error(resolving)
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and expected in err.details()

    run(main())


def test_lease_expiry_fails_the_room_and_wakes_watchers_and_resolvers():
    async def main():
        async with kvtransfer() as (svc, stub, _):
            resolving = asyncio.ensure_future(
                stub.ResolveReceiver(resolve("r1", wait_ms=5000, lease_ms=300), timeout=RPC_TIMEOUT_S))
            await until_known(svc, "r1")
            watch = stub.WatchRoom(pb.WatchRoomRequest(room_id="r1"), timeout=RPC_TIMEOUT_S)
            assert (await watch.read()).state == pb.ROOM_STATE_BOOTSTRAPPING
            t0 = asyncio.get_running_loop().time()
            err = await rpc_error(resolving)
            assert asyncio.get_running_loop().time() - t0 < 2
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "timed out in state BOOTSTRAPPING" in err.details()
            last = await watch.read()
            assert last.state == pb.ROOM_STATE_FAILED and "timed out in state BOOTSTRAPPING after" in last.error
            assert await watch.read() is grpc.aio.EOF

            # A receiver's room times out too, and the sweeper alone (no waiter) fails it.
            await stub.RegisterReceiver(register("r2", lease_ms=200), timeout=RPC_TIMEOUT_S)
            await asyncio.sleep(0.6)
            assert svc.rooms._rooms["r2"].state == pb.ROOM_STATE_FAILED
            [(state, error)] = await states_of(stub, "r2")
            assert state == pb.ROOM_STATE_FAILED and "timed out in state WAITING_FOR_INPUT" in error

    run(main())


def test_resolve_wait_is_bounded_without_failing_the_room():
    async def main():
        async with kvtransfer() as (_, stub, _):
            err = await rpc_error(stub.ResolveReceiver(resolve("r1", wait_ms=100), timeout=RPC_TIMEOUT_S))
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no receiver registered for room 'r1' within 100 ms" in err.details()
            await stub.RegisterReceiver(register("r1"), timeout=RPC_TIMEOUT_S)
            res = await stub.ResolveReceiver(resolve("r1"), timeout=RPC_TIMEOUT_S)
            assert res.state == pb.ROOM_STATE_TRANSFERRING

    run(main())


def test_report_after_terminal_changes_nothing():
    async def main():
        async with kvtransfer() as (_, stub, _):
            def report(room, state, error=""):
                return stub.ReportTransfer(pb.ReportTransferRequest(room_id=room, state=state, error=error),
                                           timeout=RPC_TIMEOUT_S)

            await stub.RegisterReceiver(register("ok"), timeout=RPC_TIMEOUT_S)
            await stub.ResolveReceiver(resolve("ok"), timeout=RPC_TIMEOUT_S)
            assert (await report("ok", pb.ROOM_STATE_SUCCESS)).state == pb.ROOM_STATE_SUCCESS
            assert (await report("ok", pb.ROOM_STATE_FAILED, "late")).state == pb.ROOM_STATE_SUCCESS
            assert await states_of(stub, "ok") == [(pb.ROOM_STATE_SUCCESS, "")]

            await stub.RegisterReceiver(register("bad"), timeout=RPC_TIMEOUT_S)
            assert (await report("bad", pb.ROOM_STATE_FAILED, "out of pages")).state == pb.ROOM_STATE_FAILED
            assert (await report("bad", pb.ROOM_STATE_SUCCESS)).state == pb.ROOM_STATE_FAILED
            assert (await report("bad", pb.ROOM_STATE_FAILED, "again")).state == pb.ROOM_STATE_FAILED
            [(state, error)] = await states_of(stub, "bad")
            assert state == pb.ROOM_STATE_FAILED and error.endswith("reported failure: out of pages")

    run(main())


def test_refusals_map_to_status_codes():
    async def main():
        async with kvtransfer(max_rooms=2) as (_, stub, _):
            err = await rpc_error(stub.ReportTransfer(pb.ReportTransferRequest(room_id="nope",
                                                                               state=pb.ROOM_STATE_FAILED),
                                                      timeout=RPC_TIMEOUT_S))
            assert err.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in err.details()
            err = await rpc_error(stub.WatchRoom(pb.WatchRoomRequest(room_id="nope"), timeout=RPC_TIMEOUT_S).read())
            assert err.code() == grpc.StatusCode.NOT_FOUND

            for version in (common_pb2.PROTOCOL_VERSION_UNSPECIFIED, 7):
                err = await rpc_error(stub.RegisterReceiver(register("v", version=version), timeout=RPC_TIMEOUT_S))
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "protocol" in err.details()
                err = await rpc_error(stub.ResolveReceiver(resolve("v", version=version), timeout=RPC_TIMEOUT_S))
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "protocol" in err.details()

            await stub.RegisterReceiver(register("r1"), timeout=RPC_TIMEOUT_S)
            err = await rpc_error(stub.RegisterReceiver(register("r1"), timeout=RPC_TIMEOUT_S))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "already exists" in err.details()

            err = await rpc_error(stub.ReportTransfer(pb.ReportTransferRequest(room_id="r1",
                                                                               state=pb.ROOM_STATE_TRANSFERRING),
                                                      timeout=RPC_TIMEOUT_S))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            await stub.ResolveReceiver(resolve("r1"), timeout=RPC_TIMEOUT_S)
            err = await rpc_error(stub.ReportTransfer(pb.ReportTransferRequest(room_id="r1",
                                                                               state=pb.ROOM_STATE_SUCCESS),
                                                      metadata=((SIDE_METADATA_KEY, "sender"),),
                                                      timeout=RPC_TIMEOUT_S))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "only the receiver" in err.details()

            err = await rpc_error(stub.RegisterReceiver(register(""), timeout=RPC_TIMEOUT_S))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            await stub.RegisterReceiver(register("r2"), timeout=RPC_TIMEOUT_S)
            err = await rpc_error(stub.RegisterReceiver(register("r3"), timeout=RPC_TIMEOUT_S))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    run(main())


# -- the relay -----------------------------------------------------------------------------------


@pytest.mark.parametrize("pull_first", [True, False], ids=["pull-before-push", "push-before-pull"])
def test_relay_passes_chunks_through_unchanged(pull_first):
    async def main():
        async with kvtransfer() as (svc, stub, _):
            await stub.RegisterReceiver(register("r1"), timeout=RPC_TIMEOUT_S)
            chunks = make_chunks("r1", 6, 48 * 1024)
            if pull_first:
                pulling = asyncio.create_task(pull_all(stub, "r1"))
                await until_pulling(svc, "r1")
                await stub.ResolveReceiver(resolve("r1"), timeout=RPC_TIMEOUT_S)
                pushed = await push_all(stub, chunks)
                pulled = await pulling
            else:
                await stub.ResolveReceiver(resolve("r1"), timeout=RPC_TIMEOUT_S)
                pushed = await push_all(stub, chunks)  # all fit in the buffer: the push ends first
                pulled = await pull_all(stub, "r1")
            assert (pushed.num_chunks, pushed.bytes) == (6, 6 * 48 * 1024)
            assert [c.SerializeToString() for c in pulled] == [c.SerializeToString() for c in chunks]
            assert [c.last for c in pulled] == [False] * 5 + [True]
            assert svc.relay.buffered_bytes == 0

    run(main())


@pytest.mark.parametrize(("ending", "code"), [("report", grpc.StatusCode.ABORTED),
                                              ("lease", grpc.StatusCode.DEADLINE_EXCEEDED)])
def test_relay_streams_end_with_an_error_when_the_room_fails(ending, code):
    async def main():
        async with kvtransfer() as (svc, stub, _):
            lease_ms = 600 if ending == "lease" else 0
            await stub.RegisterReceiver(register("r1", lease_ms=lease_ms), timeout=RPC_TIMEOUT_S)
            await stub.ResolveReceiver(resolve("r1"), timeout=RPC_TIMEOUT_S)
            chunks = make_chunks("r1", 4, 1024)
            push = stub.PushChunks(timeout=RPC_TIMEOUT_S)
            await push.write(chunks[0])
            await push.write(chunks[1])
            pull = stub.PullChunks(pb.PullChunksRequest(room_id="r1"), timeout=RPC_TIMEOUT_S)
            assert (await pull.read()).chunk_index == 0
            assert (await pull.read()).chunk_index == 1
            if ending == "report":
                await stub.ReportTransfer(pb.ReportTransferRequest(room_id="r1", state=pb.ROOM_STATE_FAILED,
                                                                   error="prefill OOM"), timeout=RPC_TIMEOUT_S)
            # Both streams end while idle: the pusher sends nothing more, the puller just waits.
            pull_err = await rpc_error(pull.read())
            push_err = await rpc_error(push)
            assert pull_err.code() == code and push_err.code() == code
            assert ("prefill OOM" if ending == "report" else "timed out") in pull_err.details()
            assert svc.relay.buffered_bytes == 0

    run(main())


def test_push_succeeds_when_the_receiver_reports_success_before_the_push_ends():
    async def main():
        async with kvtransfer() as (_, stub, _):
            await stub.RegisterReceiver(register("r1"), timeout=RPC_TIMEOUT_S)
            await stub.ResolveReceiver(resolve("r1"), timeout=RPC_TIMEOUT_S)
            chunks = make_chunks("r1", 3, 512)
            push = stub.PushChunks(timeout=RPC_TIMEOUT_S)
            for c in chunks:
                await push.write(c)
            # The receiver has everything and says so before the sender half-closes its stream.
            assert len(await pull_all(stub, "r1")) == 3
            await stub.ReportTransfer(pb.ReportTransferRequest(room_id="r1", state=pb.ROOM_STATE_SUCCESS),
                                      timeout=RPC_TIMEOUT_S)
            await asyncio.sleep(0.05)
            await push.done_writing()
            reply = await push
            assert (reply.num_chunks, reply.bytes) == (3, 3 * 512)

    run(main())


def test_a_puller_that_hangs_up_fails_the_room():
    async def main():
        async with kvtransfer() as (_, stub, _):
            await stub.RegisterReceiver(register("r1"), timeout=RPC_TIMEOUT_S)
            await stub.ResolveReceiver(resolve("r1"), timeout=RPC_TIMEOUT_S)
            watch = stub.WatchRoom(pb.WatchRoomRequest(room_id="r1"), timeout=RPC_TIMEOUT_S)
            assert (await watch.read()).state == pb.ROOM_STATE_TRANSFERRING
            push = stub.PushChunks(timeout=RPC_TIMEOUT_S)
            await push.write(make_chunks("r1", 2, 256)[0])
            pull = stub.PullChunks(pb.PullChunksRequest(room_id="r1"), timeout=RPC_TIMEOUT_S)
            await pull.read()
            pull.cancel()
            last = await watch.read()
            assert last.state == pb.ROOM_STATE_FAILED and "receiver's relay stream broke off" in last.error
            err = await rpc_error(push)
            assert err.code() == grpc.StatusCode.ABORTED

    run(main())


def test_relay_refuses_a_chunk_of_another_room():
    async def main():
        async with kvtransfer() as (_, stub, _):
            await stub.RegisterReceiver(register("r1"), timeout=RPC_TIMEOUT_S)
            await stub.ResolveReceiver(resolve("r1"), timeout=RPC_TIMEOUT_S)
            chunks = make_chunks("r1", 2, 64)
            chunks[1].room_id = "r2"
            err = await rpc_error(push_all(stub, chunks))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'r2'" in err.details()
            err = await rpc_error(pull_all(stub, "r1"))
            assert err.code() == grpc.StatusCode.ABORTED

    run(main())


def test_relay_refuses_a_chunk_over_the_room_cap():
    async def main():
        async with kvtransfer(relay_room_max_bytes=1000, relay_total_max_bytes=4000) as (_, stub, _):
            await stub.RegisterReceiver(register("r1"), timeout=RPC_TIMEOUT_S)
            await stub.ResolveReceiver(resolve("r1"), timeout=RPC_TIMEOUT_S)
            err = await rpc_error(push_all(stub, make_chunks("r1", 1, 1001)))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    run(main())


# -- the server shell ----------------------------------------------------------------------------


def test_health_serving_then_not_serving_while_draining():
    async def main():
        async with kvtransfer(drain_s=3.0) as (svc, stub, channel):
            health = health_pb2_grpc.HealthStub(channel)

            async def status(name: str = "") -> int:
                r = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=RPC_TIMEOUT_S)
                return r.status

            assert await status() == health_pb2.HealthCheckResponse.SERVING
            assert await status("moemesh.v1.KvTransfer") == health_pb2.HealthCheckResponse.SERVING
            await stub.RegisterReceiver(register("live"), timeout=RPC_TIMEOUT_S)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            stopping = asyncio.create_task(svc.stop())
            await asyncio.sleep(0.05)
            assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await status("moemesh.v1.KvTransfer") == health_pb2.HealthCheckResponse.NOT_SERVING
            # Draining: no new rooms, but the live one may still finish...
            err = await rpc_error(stub.RegisterReceiver(register("new"), timeout=RPC_TIMEOUT_S))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            await stub.ResolveReceiver(resolve("live"), timeout=RPC_TIMEOUT_S)
            await stub.ReportTransfer(pb.ReportTransferRequest(room_id="live", state=pb.ROOM_STATE_SUCCESS),
                                      timeout=RPC_TIMEOUT_S)
            # ...and once it has, the stop goes on without waiting out drain_s.
            await stopping
            assert loop.time() - t0 < 2.0

    run(main())


def test_reflection_lists_the_service():
    async def main():
        async with kvtransfer() as (_, _, channel):
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)

            async def one():
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            names = []
            async for r in stub.ServerReflectionInfo(one(), timeout=RPC_TIMEOUT_S):
                names += [s.name for s in r.list_services_response.service]
            assert "moemesh.v1.KvTransfer" in names and "grpc.health.v1.Health" in names

    run(main())


def test_stop_ends_waiters_with_unavailable():
    async def main():
        async with kvtransfer(drain_s=0.2) as (svc, stub, _):
            await stub.RegisterReceiver(register("r1"), timeout=RPC_TIMEOUT_S)
            watch = stub.WatchRoom(pb.WatchRoomRequest(room_id="r1"), timeout=RPC_TIMEOUT_S)
            assert (await watch.read()).state == pb.ROOM_STATE_WAITING_FOR_INPUT
            pulling = asyncio.create_task(pull_all(stub, "r1"))
            await until_pulling(svc, "r1")
            t0 = asyncio.get_running_loop().time()
            await svc.stop()
            assert asyncio.get_running_loop().time() - t0 < 0.9  # the drain, not the whole grace period
            last = await watch.read()
            assert last.state == pb.ROOM_STATE_FAILED and "shutting down" in last.error
            err = await rpc_error(pulling)
            assert err.code() == grpc.StatusCode.UNAVAILABLE

    run(main())
