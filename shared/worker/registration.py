"""A worker's membership in the mesh: register with the gateway, heartbeat, re-register if forgotten."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from moemesh.service.channel import CHANNEL_OPTIONS, mesh_channel
from moemesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)


class GatewayRegistration:
    """Keeps one worker registered for as long as it runs.

    Registration retries with backoff until the gateway answers (it may start after the worker);
    heartbeats carry the load at the interval the gateway asked for; a heartbeat answered
    `known=false` (the gateway restarted or dropped us) registers again.
    """

    def __init__(self, gateway: str, request: gateway_pb2.RegisterWorkerRequest,
                 load: Callable[[], common_pb2.WorkerLoad]) -> None:
        self.gateway = gateway
        self.request = request
        self.load = load
        self.draining = False
        self.registered = asyncio.Event()
        self._interval_s = 1.0
        self._task: asyncio.Task | None = None
        self._channel = mesh_channel(gateway, options=CHANNEL_OPTIONS)
        self._stub = gateway_pb2_grpc.WorkerRegistryStub(self._channel)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gateway-registration")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.registered.is_set():
            try:
                await self._stub.Deregister(gateway_pb2.DeregisterWorkerRequest(worker_id=self.request.worker_id),
                                            timeout=2)
            except grpc.aio.AioRpcError as e:
                log.info("deregistration failed: %s", e.details())
        await self._channel.close()

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                if not self.registered.is_set():
                    self.request.load.CopyFrom(self.load())
                    resp = await self._stub.Register(self.request, timeout=5)
                    self._interval_s = max(resp.heartbeat_interval_ms, 100) / 1000
                    self.registered.set()
                    log.info("registered with gateway %s as %s", self.gateway, self.request.worker_id)
                    backoff = 0.2
                else:
                    hb = gateway_pb2.HeartbeatRequest(worker_id=self.request.worker_id, load=self.load(),
                                                      draining=self.draining)
                    resp = await self._stub.Heartbeat(hb, timeout=max(self._interval_s * 2, 2))
                    if not resp.known:
                        self.registered.clear()
                        continue
                await asyncio.sleep(self._interval_s)
            except grpc.aio.AioRpcError as e:
                if self.registered.is_set():
                    log.warning("heartbeat to %s failed: %s", self.gateway, e.code().name)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
