"""The data plane's fault hook (`MOEMESH_FAULT_KV`, shared/transfer/faults.py) on real planes.

inproc, relay through a real kvtransfer service on loopback (rooms opened as the workers open them), TCP on
loopback, and UCX where ucxx is installed. With the hook set: a corrupt chunk is refused by its checksum and fails the
room with a clear error, never writing wrong rows; dropped chunks end the room cleanly within its lease;
a delay only slows. Unset: senders carry no injector and rows move bit-exactly. A malformed variable
fails a worker's start-up. L layers, N tokens, W row width.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from moemesh.service.channel import CHANNEL_OPTIONS
from moemesh.services.kvtransfer.config import KvTransferConfig
from moemesh.services.kvtransfer.service import KvTransferService
from moemesh.transfer import faults
from moemesh.transfer.base import FirstToken, KvReceiver, KvSender, RowBlock, TransferError
from moemesh.transfer.chunk import dtype_to_proto
from moemesh.transfer.faults import ENV, FaultInjector, KvFaults
from moemesh.transfer.registry import make_receiver, make_sender
from moemesh.v1 import common_pb2, kvtransfer_pb2, kvtransfer_pb2_grpc

pytestmark = pytest.mark.timeout(60)
PLANES = ["inproc", "relay", "tcp", pytest.param("ucx", marks=pytest.mark.skipif(
    importlib.util.find_spec("ucxx") is None, reason="ucxx-cu12 not installed"))]
SHAPE = (2, 64, 48)  # [L, N, W] float32: 384 bytes per token
CHUNK_BYTES = 8 * 384  # 8 tokens per chunk: 8 row chunks and the closing one
LEASE_MS = 1500
# The test that waits a whole lease out uses a shorter one: what it checks does not depend on its length.
SHORT_LEASE_MS = 400


@pytest.fixture
def fault_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Set MOEMESH_FAULT_KV (or unset it with None) and re-read it; the process's state is restored after."""

    def set_to(spec: str | None) -> KvFaults | None:
        if spec is None:
            monkeypatch.delenv(ENV, raising=False)
        else:
            monkeypatch.setenv(ENV, spec)
        return faults.reload()

    yield set_to
    monkeypatch.delenv(ENV, raising=False)
    faults.reload()


def rows_of(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


async def blocks(rows: torch.Tensor) -> AsyncIterator[RowBlock]:
    for start in range(0, rows.shape[1], 16):
        yield RowBlock(start, rows[:, start:start + 16])
        await asyncio.sleep(0)


async def first_token() -> FirstToken:
    return FirstToken(7)


@contextlib.asynccontextmanager
async def kvtransfer() -> AsyncIterator[str]:
    svc = KvTransferService(KvTransferConfig(port=0, sweep_interval_s=0.05, drain_s=0.0, shutdown_grace_s=1.0))
    await svc.start()
    try:
        yield svc.address
    finally:
        await svc.stop()


class Planes:
    """A started receiver and a sender of one plane; `open_room` does the rendezvous where the plane needs it."""

    def __init__(self, sender: KvSender, receiver: KvReceiver, kv_target: str | None) -> None:
        self.sender = sender
        self.receiver = receiver
        self.kv_target = kv_target

    async def open_room(self, room: str, num_tokens: int, lease_ms: int = LEASE_MS) -> None:
        if self.kv_target is None:
            return
        # As the workers do: the receiver registers (its lease bounds the room), the sender resolves.
        layout = common_pb2.KvLayout(model_fingerprint="faults", num_layers=SHAPE[0], page_size_tokens=1,
                                     kv_lora_rank=SHAPE[2], qk_rope_head_dim=0, dtype=dtype_to_proto(torch.float32))
        v1 = common_pb2.PROTOCOL_VERSION_V1
        async with grpc.aio.insecure_channel(self.kv_target, options=CHANNEL_OPTIONS) as ch:
            stub = kvtransfer_pb2_grpc.KvTransferStub(ch)
            await stub.RegisterReceiver(kvtransfer_pb2.RegisterReceiverRequest(
                protocol_version=v1, room_id=room, layout=layout, data_plane=kvtransfer_pb2.DATA_PLANE_RELAY,
                num_tokens=num_tokens, lease_ms=lease_ms), timeout=5)
            await stub.ResolveReceiver(kvtransfer_pb2.ResolveReceiverRequest(
                protocol_version=v1, room_id=room, layout=layout, wait_ms=1000), timeout=5)


@contextlib.asynccontextmanager
async def planes(plane: str) -> AsyncIterator[Planes]:
    """Sender and receiver of `plane`, the sender built now (so it takes the hook's current setting)."""
    async with contextlib.AsyncExitStack() as stack:
        kw: dict[str, Any] = {}
        target = None
        if plane == "relay":
            target = await stack.enter_async_context(kvtransfer())
            kw["target"] = target
        receiver = make_receiver(plane, **kw)
        sender = make_sender(plane, max_chunk_bytes=CHUNK_BYTES, **kw)
        stack.push_async_callback(receiver.close)
        stack.push_async_callback(sender.close)
        await receiver.start()
        yield Planes(sender, receiver, target)


async def transfer(p: Planes, rows: torch.Tensor, timeout_s: float = LEASE_MS / 1000, lease_ms: int = LEASE_MS
                   ) -> tuple[BaseException | tuple[FirstToken, int], BaseException | int, torch.Tensor, float]:
    """Send and receive one room (kvtransfer's lease `lease_ms`, where the plane has a rendezvous); returns
    (receive outcome, send outcome, pages written, seconds)."""
    room = uuid.uuid4().hex
    await p.open_room(room, rows.shape[1], lease_ms)
    pages = torch.full_like(rows, float("nan"))

    def write(start: int, block: torch.Tensor) -> None:
        pages[:, start:start + block.shape[1]] = block

    t0 = time.monotonic()
    recv = asyncio.ensure_future(p.receiver.receive(room, rows.shape[1], write, timeout_s))
    await asyncio.sleep(0)
    send = asyncio.ensure_future(p.sender.send(room, p.receiver.address, blocks(rows), first_token()))
    got = await asyncio.gather(recv, return_exceptions=True)
    elapsed = time.monotonic() - t0
    sent = await asyncio.gather(asyncio.wait_for(send, 10), return_exceptions=True)
    return got[0], sent[0], pages, elapsed


def written_rows_are_right(pages: torch.Tensor, rows: torch.Tensor) -> bool:
    """Every token that was written holds exactly the sent rows (NaN marks tokens never written)."""
    written = ~torch.isnan(pages).any(dim=2).any(dim=0)
    return torch.equal(pages[:, written], rows[:, written])


# -- the variable ---------------------------------------------------------------------------------


def test_parse_and_errors() -> None:
    assert KvFaults.parse("drop=0.1,delay_ms=50,corrupt=0.05,seed=1") == KvFaults(0.1, 0.05, 50.0, 1)
    assert KvFaults.parse(" corrupt = 1 , ") == KvFaults(corrupt=1.0)
    assert faults.from_env({}) is None and faults.from_env({ENV: "  "}) is None
    assert faults.from_env({ENV: "drop=0,seed=3"}) is None  # nothing to inject: off
    assert faults.from_env({ENV: "delay_ms=5"}) == KvFaults(delay_ms=5.0)
    bad = {
        "dorp=0.1": "unknown key 'dorp'",
        "drop": "'drop' is not KEY=VALUE",
        "drop=": "'drop=' is not KEY=VALUE",
        "drop=lots": "drop must be a number, not 'lots'",
        "seed=1.5": "seed must be an integer",
        "drop=1.5": r"drop must be a probability in \[0, 1\]",
        "corrupt=nan": "corrupt must be a probability",
        "drop=0.6,corrupt=0.6": "drop \\+ corrupt must not exceed 1",
        "delay_ms=-1": "delay_ms must be >= 0",
        "drop=0.1,drop=0.2": "drop is given twice",
    }
    for spec, match in bad.items():
        with pytest.raises(ValueError, match=match) as e:
            faults.from_env({ENV: spec})
        assert ENV in str(e.value)


@pytest.mark.parametrize("plane", PLANES)
def test_unset_changes_nothing(plane: str, fault_env: Any) -> None:
    assert fault_env(None) is None
    rows = rows_of(1)

    async def main() -> Any:
        async with planes(plane) as p:
            assert p.sender.faults is None  # type: ignore[attr-defined]
            return await transfer(p, rows)

    got, sent, pages, _ = asyncio.run(main())
    assert got == (FirstToken(7), rows.numel() * 4) and sent == rows.numel() * 4
    assert torch.equal(pages, rows)


# -- faults on every plane ------------------------------------------------------------------------


@pytest.mark.parametrize("plane", PLANES)
def test_corrupt_chunks_are_refused_by_their_checksum(plane: str, fault_env: Any) -> None:
    fault_env("corrupt=1")
    rows = rows_of(2)

    async def main() -> Any:
        async with planes(plane) as p:
            injector = p.sender.faults  # type: ignore[attr-defined]
            assert isinstance(injector, FaultInjector) and injector.faults == KvFaults(corrupt=1.0)
            return await transfer(p, rows)

    got, _, pages, elapsed = asyncio.run(main())
    assert isinstance(got, TransferError), got
    assert "chunk 0: checksum mismatch (data corrupted in transit)" in str(got)
    assert torch.isnan(pages).all()  # the corrupt rows never reached the pages
    assert elapsed < 1.0  # refused on arrival, not at the lease


@pytest.mark.parametrize("plane", PLANES)
def test_some_corrupt_chunks_never_write_wrong_rows(plane: str, fault_env: Any) -> None:
    # Seeded: a few clean chunks go through (and are written) before the first corrupt one.
    fault_env("corrupt=0.3,seed=0")
    rows = rows_of(3)

    async def main() -> Any:
        async with planes(plane) as p:
            outcome = await transfer(p, rows)
            return outcome, p.sender.faults.corrupted  # type: ignore[attr-defined]

    (got, _, pages, _), corrupted = asyncio.run(main())
    assert corrupted >= 1
    assert isinstance(got, TransferError) and "checksum mismatch" in str(got)
    assert not torch.isnan(pages).all(), "seed 0 lets chunks 0-2 through"
    assert written_rows_are_right(pages, rows)


@pytest.mark.parametrize("plane", PLANES)
def test_a_dropped_chunk_fails_the_room_cleanly(plane: str, fault_env: Any) -> None:
    # Seeded so that a chunk in the middle goes missing: the next one reveals the gap at once.
    fault_env("drop=0.2,seed=2")
    rows = rows_of(4)

    async def main() -> Any:
        async with planes(plane) as p:
            outcome = await transfer(p, rows)
            return outcome, p.sender.faults.dropped  # type: ignore[attr-defined]

    (got, _, pages, elapsed), dropped = asyncio.run(main())
    assert dropped >= 1
    assert isinstance(got, TransferError) and "gap: got chunk" in str(got), got
    assert elapsed < LEASE_MS / 1000
    assert written_rows_are_right(pages, rows)


@pytest.mark.parametrize("plane", PLANES)
def test_every_chunk_dropped_ends_within_the_lease(plane: str, fault_env: Any) -> None:
    fault_env("drop=1")
    rows = rows_of(5)

    async def main() -> Any:
        async with planes(plane) as p:
            # Through the relay the receive waits longer than the lease: kvtransfer's lease must end it.
            return await transfer(p, rows, timeout_s=lease_s + (3 if plane == "relay" else 0),
                                  lease_ms=SHORT_LEASE_MS)

    lease_s = SHORT_LEASE_MS / 1000
    got, _, pages, elapsed = asyncio.run(main())
    assert isinstance(got, TransferError), got
    if plane == "relay":
        # kvtransfer fails the room when its lease runs out, and the relay ends the receiver's pull with it.
        assert "DEADLINE_EXCEEDED" in str(got) and "lease" in str(got)
    else:
        assert f"timed out after {lease_s:g} s (0 chunks arrived, 0 tokens written, 64 tokens expected)" in str(got)
    assert lease_s - 0.1 < elapsed < lease_s + 2.0
    assert torch.isnan(pages).all()


@pytest.mark.parametrize("plane", PLANES)
def test_a_delay_only_slows(plane: str, fault_env: Any) -> None:
    fault_env("delay_ms=30")
    rows = rows_of(6)

    async def main() -> Any:
        async with planes(plane) as p:
            return await transfer(p, rows, timeout_s=10)

    got, sent, pages, elapsed = asyncio.run(main())
    assert got == (FirstToken(7), rows.numel() * 4) and sent == rows.numel() * 4
    assert torch.equal(pages, rows)
    assert elapsed >= 9 * 0.030  # 8 row chunks and the closing one, each held back


def test_the_relay_sender_learns_of_a_refused_room(fault_env: Any) -> None:
    # The receiver gives up on a corrupt chunk; the relay fails the room, which ends the sender's push too.
    fault_env("corrupt=1")
    rows = torch.randn((2, 4096, 48), generator=torch.Generator().manual_seed(7))  # 512 chunks: still sending

    async def main() -> Any:
        async with planes("relay") as p:
            return await transfer(p, rows)

    got, sent, _, _ = asyncio.run(main())
    assert isinstance(got, TransferError) and "checksum mismatch" in str(got)
    assert isinstance(sent, TransferError), sent
    assert "relay push" in str(sent) and "ABORTED" in str(sent)


def test_a_corrupt_chunk_fails_the_request_with_a_clear_error(small_dir: Path, fault_env: Any) -> None:
    # Real prefill and decode workers with the relay between them (in this process): the prefill's sender,
    # made on its first transfer, takes the hook; the decode worker's receive refuses the chunk, and the
    # request's token stream ends with an error that says why, long before any lease.
    from moemesh.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
    from tests.service.service.test_fuzz_grpc import InProcessMesh

    fault_env("corrupt=1")
    prompt = list(range(1, 40))
    sampling = common_pb2.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    async def main(addresses: dict[str, str]) -> tuple[Any, Any, float]:
        async with grpc.aio.insecure_channel(addresses["decode"]) as d, \
                grpc.aio.insecure_channel(addresses["prefill"]) as p:
            t0 = time.monotonic()
            decode = decode_pb2_grpc.DecodeStub(d).Generate(decode_pb2.DecodeRequest(
                request_id="faulty", room_id="faulty-room", prompt_token_ids=prompt, sampling=sampling), timeout=30)
            prefill = prefill_pb2_grpc.PrefillStub(p).Prefill(prefill_pb2.PrefillRequest(
                request_id="faulty", room_id="faulty-room", prompt_token_ids=prompt, sampling=sampling), timeout=30)

            async def tokens() -> list[int]:
                return [t async for r in decode for t in r.token_ids]

            got = await asyncio.gather(tokens(), prefill, return_exceptions=True)
            return got[0], got[1], time.monotonic() - t0

    with InProcessMesh(small_dir) as mesh:
        decoded, prefilled, elapsed = asyncio.run(main(mesh.addresses))
    assert isinstance(decoded, grpc.aio.AioRpcError), decoded
    assert decoded.code() == grpc.StatusCode.UNAVAILABLE
    assert "checksum mismatch (data corrupted in transit)" in decoded.details()
    # The prefill returns once its chunks left (the relay may have taken them all before the refusal).
    if isinstance(prefilled, grpc.aio.AioRpcError):
        assert prefilled.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), prefilled.details()
    assert elapsed < 15
