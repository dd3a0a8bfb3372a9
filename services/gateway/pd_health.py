"""Is disaggregation possible right now? The gateway watches kvtransfer (the KV handoff's rendezvous): while
it is unreachable or not serving, requests go colocated (decode workers prefill) instead of failing."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Gauge

from moemesh.service.channel import CHANNEL_OPTIONS, mesh_channel

log = logging.getLogger(__name__)

PD_FALLBACK = Gauge("moemesh_gateway_pd_fallback",
                    "1 while kvtransfer is unreachable and requests run colocated (decode workers prefill).")


class KvTransferHealth:
    """Polls kvtransfer's grpc.health.v1 every `interval_s`; `available` is False after a failed check."""

    def __init__(self, address: str, interval_s: float = 1.0, timeout_s: float = 1.0) -> None:
        self.address = address
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.available = True  # optimistic until a check says otherwise: the first requests try PD
        self._channel = mesh_channel(address, options=CHANNEL_OPTIONS)
        self._stub = health_pb2_grpc.HealthStub(self._channel)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kvtransfer-health")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._channel.close()

    async def check(self) -> bool:
        """Check now (also called when a disaggregated request failed); returns and records the answer."""
        try:
            resp = await self._stub.Check(health_pb2.HealthCheckRequest(), timeout=self.timeout_s)
            ok, why = resp.status == health_pb2.HealthCheckResponse.SERVING, "it is not serving"
        except grpc.aio.AioRpcError as e:
            ok, why = False, f"{e.code().name}: {e.details()}"
        if ok != self.available:
            if ok:
                log.warning("kvtransfer at %s is back: requests are disaggregated again", self.address)
            else:
                log.warning("kvtransfer at %s is unavailable (%s): requests run colocated, decode workers "
                            "prefill", self.address, why)
        self.available = ok
        PD_FALLBACK.set(0 if ok else 1)
        return ok

    async def _run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval_s)
