"""A rank's expert-load stream (`ExpertLoadReporter._send_forever`) against a real grpc.aio server that records
each report: the placement (L x P slots) rides only on a stream's first report and the first after a
switch; a new stream (the balancer restarted) starts with it again, and no report is lost to the
reconnection."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import torch

from moemesh.v1 import eplb_pb2, eplb_pb2_grpc
from moemesh.worker.expert_stats import ExpertLoadReporter, GroupIdentity

L, P = 2, 6
WAIT_S = 30.0  # the reporter's reconnect backoff reaches 10 s on a loaded machine


class RecordingEplb(eplb_pb2_grpc.EplbServicer):
    """TEST DOUBLE of the eplb service's report endpoint: keeps (placement version, slots sent) per report."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []
        self.arrived = asyncio.Event()

    async def ReportExpertLoad(self, request_iterator: Any, context: Any) -> eplb_pb2.ReportExpertLoadResponse:
        async for report in request_iterator:
            self.seen.append((report.placement_version, len(report.phy2log)))
            self.arrived.set()
        return eplb_pb2.ReportExpertLoadResponse()

    async def wait_for(self, n: int) -> None:
        async with asyncio.timeout(WAIT_S):
            while len(self.seen) < n:
                self.arrived.clear()
                await self.arrived.wait()


@contextlib.asynccontextmanager
async def eplb_server(port: int = 0) -> AsyncIterator[tuple[RecordingEplb, int]]:
    server = grpc.aio.server()
    servicer = RecordingEplb()
    eplb_pb2_grpc.add_EplbServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield servicer, port
    finally:
        await server.stop(0)


def reporter(address: str) -> ExpertLoadReporter:
    # The reporter only reads the engine's expert-load counter at construction; the stream is under test.
    engine = SimpleNamespace(engine=SimpleNamespace(expert_load=SimpleNamespace(snapshot=torch.zeros(L, 4))))
    return ExpertLoadReporter(engine, GroupIdentity("g", 0, 0), address, None)  # type: ignore[arg-type]


def window(version: int) -> eplb_pb2.ExpertLoadReport:
    return eplb_pb2.ExpertLoadReport(placement_version=version, num_layers=L, num_physical_experts=P,
                                     phy2log=[slot % 4 for slot in range(L * P)])


def test_placement_rides_on_first_report_of_a_stream_and_after_a_switch() -> None:
    async def main() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        async with eplb_server() as (first, port):
            r = reporter(f"127.0.0.1:{port}")
            sender = asyncio.create_task(r._send_forever())
            try:
                for version in (0, 0, 0, 3, 3):
                    r._queue.put_nowait(window(version))
                await first.wait_for(5)
            except BaseException:
                sender.cancel()
                raise
        # The balancer went away and comes back on the same port: the next stream starts afresh.
        async with eplb_server(port) as (second, _):
            try:
                for version in (3, 3):
                    r._queue.put_nowait(window(version))
                await second.wait_for(2)
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
        return first.seen, second.seen

    first, second = asyncio.run(main())
    assert first == [(0, L * P), (0, 0), (0, 0), (3, L * P), (3, 0)]
    assert second == [(3, L * P), (3, 0)]
