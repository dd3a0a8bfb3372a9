"""How fast an overloaded mesh refuses: floods of requests, all sent at once, against a mesh that holds few.

    python -m moemesh.bench.overload [--flood 200] [--rounds 3] [--protocols rest,grpc]

The mesh is tests/processes/mesh/test_overload.py's: `moemesh up --prefill 0 --decode 1` whose decode worker
runs 4 requests and queues 8 (`--max-num-seqs 4 --max-waiting-requests 8`) and whose gateway admits 8 at once
(MOEMESH_MAX_CONCURRENT_REQUESTS). That test asserts the behaviour (every request finishes whole or is refused
with a retry hint); this measures the time: per flood, the seconds from sending to the answer of refused
requests (429 / RESOURCE_EXHAUSTED) and of finished ones, as percentiles, and the wall time of the flood.
A refusal never waits for capacity, but the last of a flood's requests waits its turn on the gateway's one
event loop (HTTP parsing, tokenizing), shared with this client and the workers on the same host.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import time
from dataclasses import dataclass

import grpc
import httpx

from moemesh.service.launch import start_mesh
from moemesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

PROMPT = "Overload: the mesh refuses what it cannot hold, and finishes what it took."
UP_ARGS = ["--prefill", "0", "--decode", "1", "--", "--max-num-seqs", "4", "--max-waiting-requests", "8",
           "--kv-cache-mb", "64"]


@dataclass
class Sample:
    refused: bool
    seconds: float


async def rest_one(client: httpx.AsyncClient, max_tokens: int) -> Sample:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    r = await client.post("/v1/completions", json=body)
    seconds = time.perf_counter() - t0
    if r.status_code not in (200, 429):
        raise RuntimeError(f"REST answered {r.status_code}: {r.text[:300]}")
    return Sample(r.status_code == 429, seconds)


async def grpc_one(stub: gateway_pb2_grpc.GatewayStub, max_tokens: int) -> Sample:
    req = gateway_pb2.GenerateRequest(prompt=PROMPT, sampling=common_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=0, ignore_eos=True))
    t0 = time.perf_counter()
    try:
        async for _ in stub.Generate(req, timeout=120):
            pass
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise RuntimeError(f"gRPC ended with {e.code().name}: {e.details()}") from None
        return Sample(True, time.perf_counter() - t0)
    return Sample(False, time.perf_counter() - t0)


async def flood(protocol: str, rest: str, gateway: str, n: int, max_tokens: int) -> tuple[list[Sample], float]:
    """`n` requests sent at once; their samples and the flood's wall time."""
    t0 = time.perf_counter()
    if protocol == "rest":
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=f"http://{rest}", trust_env=False, limits=limits, timeout=120) as c:
            samples = await asyncio.gather(*(rest_one(c, max_tokens) for _ in range(n)))
    else:
        async with grpc.aio.insecure_channel(gateway) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            samples = await asyncio.gather(*(grpc_one(stub, max_tokens) for _ in range(n)))
    return list(samples), time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0 < q <= 100), nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def row(protocol: str, samples: list[Sample], wall_s: float) -> str:
    refused = [s.seconds for s in samples if s.refused]
    done = [s.seconds for s in samples if not s.refused]
    return (f"{protocol:<5} {len(done):>8} {len(refused):>7}   {pct(refused, 50):6.3f} {pct(refused, 90):6.3f} "
            f"{pct(refused, 100):6.3f}   {pct(done, 50):6.3f} {pct(done, 100):6.3f}   {wall_s:6.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flood", type=int, default=200, help="requests sent at once per flood")
    p.add_argument("--rounds", type=int, default=3, help="floods per protocol")
    p.add_argument("--protocols", default="rest,grpc", help="comma-separated: rest, grpc")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens each admitted request generates")
    p.add_argument("--gateway-limit", type=int, default=8, help="the gateway's MOEMESH_MAX_CONCURRENT_REQUESTS")
    args = p.parse_args(argv)
    protocols = [s.strip() for s in args.protocols.split(",") if s.strip()]
    if not protocols or set(protocols) - {"rest", "grpc"}:
        p.error(f"--protocols: choose from rest, grpc, not {args.protocols!r}")
    env = {**os.environ, "MOEMESH_MAX_CONCURRENT_REQUESTS": str(args.gateway_limit)}
    mesh = start_mesh(UP_ARGS, env=env)
    try:
        gateway = mesh.services["gateway"]
        print(f"moemesh bench overload: floods of {args.flood} requests ({args.max_tokens} tokens each), gateway "
              f"limit {args.gateway_limit}, decode worker 4 running + 8 queued; {os.cpu_count()} cores, load "
              f"average {os.getloadavg()[0]:.1f} at the start")
        print("proto finished refused   refusal s: p50    p90    max   finished s: p50 max   flood s")
        for protocol in protocols:
            for _ in range(args.rounds):
                samples, wall_s = asyncio.run(flood(protocol, gateway.http_address, gateway.address, args.flood,
                                                    args.max_tokens))
                print(row(protocol, samples, wall_s), flush=True)
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
    finally:
        mesh.stop()
        mesh.kill_leftovers()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
