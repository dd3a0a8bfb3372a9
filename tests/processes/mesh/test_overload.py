"""Overload with real processes: many more concurrent requests than the mesh holds, over REST and gRPC.

The mesh (`moemesh up --prefill 0 --decode 1`) holds few requests on purpose: the decode worker runs 4
and queues 8 (`--max-num-seqs 4 --max-waiting-requests 8`), the gateway admits 8 at once
(MOEMESH_MAX_CONCURRENT_REQUESTS). Every request of a flood of 200 either finishes with all its tokens
or is refused with 429 and `Retry-After` / RESOURCE_EXHAUSTED and `retry-after-ms`; nothing else
(no 5xx, no hang). A refusal does not wait for capacity: the gateway refuses past its limit while the
requests that fill it are still running. Afterwards the worker is idle (no request or page
left behind), and repeated floods leave the gateway's and the worker's resident memory where it was
(growth below RSS_GROWTH_MIB).

How fast refusals come is a benchmark, not an assertion (it depends on the host's load):
`python -m moemesh.bench.overload` (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import httpx
import pytest

from moemesh.sdk import AsyncMeshClient, ResourceExhaustedError
from moemesh.service.errors import retry_after_from_metadata
from moemesh.v1 import common_pb2, decode_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from tests.processes.mesh.launch import RunningMesh, start_mesh

pytestmark = pytest.mark.timeout(600)

FLOOD = 200
MAX_TOKENS = 16
GATEWAY_LIMIT = 8
# Floods of FLOOD requests must not leave this much more memory resident in a process (a bounded queue
# holds at most its bound of requests; an unbounded one grows with every flood). Measured: < 4 MiB.
RSS_GROWTH_MIB = 32
PROMPT = "Overload: the mesh refuses what it cannot hold, and finishes what it took."


@dataclass
class Outcome:
    """One request of a flood: finished (tokens) or refused (retry hint)."""

    ok: bool
    tokens: int = 0
    finish_reason: str = ""
    retry_after_s: float | None = None
    sees_hint: bool = True  # the client can see the retry hint (the SDK's errors do not carry it)
    detail: str = ""


@pytest.fixture(scope="module")
def mesh() -> Iterator[RunningMesh]:
    running = start_mesh("--prefill", "0", "--decode", "1", "--",
                         "--max-num-seqs", "4", "--max-waiting-requests", "8", "--kv-cache-mb", "64",
                         env={"MOEMESH_MAX_CONCURRENT_REQUESTS": str(GATEWAY_LIMIT)})
    try:
        yield running
    finally:
        running.stop()
    assert running.proc.returncode == 0


def _decode(mesh: RunningMesh) -> tuple[str, int]:
    (addr_pid,) = [v for name, v in mesh.services.items() if name.startswith("decode")]
    return addr_pid


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _assert_idle(mesh: RunningMesh, deadline_s: float = 20) -> None:
    """The worker holds no request and no page once the flood is over (refused ones left nothing)."""
    addr, _ = _decode(mesh)
    end = time.monotonic() + deadline_s
    with grpc.insecure_channel(addr) as ch:
        while True:
            load = decode_pb2_grpc.DecodeStub(ch).GetLoad(common_pb2.GetLoadRequest(), timeout=10)
            if (load.num_running_requests, load.num_waiting_requests) == (0, 0) \
                    and load.num_free_pages == load.num_total_pages:
                return
            assert time.monotonic() < end, f"the decode worker is not idle after the flood: {load}"
            time.sleep(0.1)


def _check(outcomes: list[Outcome]) -> None:
    """Every request finished whole or was refused with a hint; both happened."""
    done = [o for o in outcomes if o.ok]
    refused = [o for o in outcomes if not o.ok]
    assert len(outcomes) == FLOOD
    assert done and refused, f"{len(done)} finished, {len(refused)} refused: the flood did not overload the mesh"
    for o in done:
        assert (o.tokens, o.finish_reason) == (MAX_TOKENS, "length"), o
    for o in refused:
        assert not o.sees_hint or (o.retry_after_s is not None and o.retry_after_s > 0), o


# ---- REST --------------------------------------------------------------------------------------
async def _rest_one(client: httpx.AsyncClient, stream: bool) -> Outcome:
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            text = (await r.aread()).decode()
    else:
        r = await client.post("/v1/completions", json=body)
        text = r.text
    if r.status_code == 429:
        error = r.json()["error"]
        assert error["type"] == "rate_limit_error" and error["message"], error
        return Outcome(False, retry_after_s=float(r.headers["retry-after"]), detail=error["message"])
    assert r.status_code == 200, (r.status_code, text[:500])
    if not stream:
        (choice,) = r.json()["choices"]
        return Outcome(True, r.json()["usage"]["completion_tokens"], choice["finish_reason"])
    # Streamed: a refusal before the first token is a 429 status (above); here every chunk is tokens.
    assert '"error"' not in text, text[:500]
    chunks = [line for line in text.split("\n\n") if line.startswith("data: {")]
    reasons = [c for c in chunks if '"finish_reason":"length"' in c]
    return Outcome(True, MAX_TOKENS if reasons else 0, "length" if reasons else "")


async def rest_flood(mesh: RunningMesh) -> list[Outcome]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=f"http://{mesh.services['gateway-http'][0]}", trust_env=False,
                                 limits=limits, timeout=120) as client:
        return list(await asyncio.gather(*(_rest_one(client, i % 2 == 1) for i in range(FLOOD))))


def test_rest_flood_is_429_with_retry_after_and_the_admitted_finish(mesh: RunningMesh) -> None:
    outcomes = asyncio.run(rest_flood(mesh))
    _check(outcomes)
    assert all(o.retry_after_s >= 1 and o.retry_after_s == int(o.retry_after_s) for o in outcomes if not o.ok)
    _assert_idle(mesh)


# ---- gRPC: the SDK, and the raw stub for the trailing metadata ----------------------------------
async def _sdk_one(client: AsyncMeshClient) -> Outcome:
    try:
        done = await client.generate(PROMPT, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    except ResourceExhaustedError as e:
        # The SDK keeps the status and the message; the hint travels as trailing metadata (see _raw_one).
        return Outcome(False, sees_hint=False, detail=e.message)
    return Outcome(True, done.usage.completion_tokens, done.finish_reason)


async def _raw_one(stub: gateway_pb2_grpc.GatewayStub) -> Outcome:
    req = gateway_pb2.GenerateRequest(prompt=PROMPT, sampling=common_pb2.SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    tokens, finish = 0, 0
    try:
        async for r in stub.Generate(req, timeout=120):
            tokens += len(r.token_ids)
            finish = r.finish_reason or finish
    except grpc.aio.AioRpcError as e:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
        return Outcome(False, retry_after_s=retry_after_from_metadata(e.trailing_metadata()),
                       detail=e.details() or "")
    reason = common_pb2.FinishReason.Name(finish).removeprefix("FINISH_REASON_").lower()
    return Outcome(True, tokens, reason)


async def grpc_flood(mesh: RunningMesh) -> list[Outcome]:
    async with AsyncMeshClient(mesh.gateway, timeout_s=120) as client, \
            grpc.aio.insecure_channel(mesh.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        return list(await asyncio.gather(*(_sdk_one(client) if i % 2 else _raw_one(stub) for i in range(FLOOD))))


def test_grpc_flood_is_resource_exhausted_with_retry_after_ms(mesh: RunningMesh) -> None:
    outcomes = asyncio.run(grpc_flood(mesh))
    _check(outcomes)
    _assert_idle(mesh)


# ---- the gateway's own bound -------------------------------------------------------------------
def test_the_gateway_refuses_beyond_its_limit_before_any_worker(mesh: RunningMesh) -> None:
    """GATEWAY_LIMIT long requests fill the gateway (the worker could queue more): the next is refused by
    the gateway's admission (its message), not by the worker, without waiting for a slot (the long ones are
    all still running when it comes back), and the long ones still finish."""

    async def main() -> None:
        async with AsyncMeshClient(mesh.gateway, timeout_s=300) as client:
            long = [asyncio.create_task(client.generate(PROMPT, max_tokens=400, temperature=0, ignore_eos=True))
                    for _ in range(GATEWAY_LIMIT)]
            await _until_at_worker(mesh, GATEWAY_LIMIT, long)
            with pytest.raises(ResourceExhaustedError, match="max-concurrent-requests"):
                await client.generate(PROMPT, max_tokens=4)
            assert not any(t.done() for t in long), "the refusal waited for a long request to end"
            done = await asyncio.gather(*long)
            assert all(d.usage.completion_tokens == 400 for d in done)

    asyncio.run(main())
    _assert_idle(mesh)


async def _until_at_worker(mesh: RunningMesh, n: int, tasks: list[asyncio.Task], deadline_s: float = 60) -> None:
    """Until the decode worker holds `n` requests (running or queued): the gateway admitted them all."""
    addr, _ = _decode(mesh)
    end = time.monotonic() + deadline_s
    async with grpc.aio.insecure_channel(addr) as ch:
        while True:
            load = await decode_pb2_grpc.DecodeStub(ch).GetLoad(common_pb2.GetLoadRequest(), timeout=10)
            if load.num_running_requests + load.num_waiting_requests == n:
                return
            assert not any(t.done() for t in tasks), "a long request ended before the gateway was full"
            assert time.monotonic() < end, f"the worker never held {n} requests: {load}"
            await asyncio.sleep(0.05)


# ---- memory ------------------------------------------------------------------------------------
def test_memory_stays_bounded_under_repeated_floods(mesh: RunningMesh) -> None:
    gateway_pid, decode_pid = mesh.services["gateway"][1], _decode(mesh)[1]
    asyncio.run(rest_flood(mesh))  # warm-up: allocator pools, connection buffers, compiled paths
    asyncio.run(grpc_flood(mesh))
    before = {pid: _rss_mib(pid) for pid in (gateway_pid, decode_pid)}
    for _ in range(3):
        _check(asyncio.run(rest_flood(mesh)))
        _check(asyncio.run(grpc_flood(mesh)))
    _assert_idle(mesh)
    growth = {pid: _rss_mib(pid) - before[pid] for pid in before}
    print(f"RSS before {before} MiB, growth after 6 floods of {FLOOD}: {growth} MiB")
    for pid, mib in growth.items():
        name = "gateway" if pid == gateway_pid else "decode worker"
        assert mib < RSS_GROWTH_MIB, f"the {name}'s resident memory grew by {mib:.1f} MiB over 6 floods"
