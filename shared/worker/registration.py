"""A worker's membership in the mesh: register with the gateway, heartbeat, re-register if forgotten."""

from __future__ import annotations

import asyncio
import logging
import socket
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


# How often a `dns:///` gateway name is resolved again, to register with replicas that appeared since.
DNS_REFRESH_S = 5.0


def parse_gateways(spec: str) -> tuple[list[str], str | None]:
    """`--gateway`: 'host:port', a comma-separated list of them, or 'dns:///NAME:PORT' (every address the name
    resolves to, resolved again every few seconds). Returns (the listed addresses, the DNS name or None)."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    names = [s for s in items if s.startswith("dns:")]
    if names and len(items) > 1:
        raise ValueError(f"--gateway takes a list of addresses or one dns:/// name, not both: {spec!r}")
    if names:
        name = names[0].removeprefix("dns:").lstrip("/")
        if ":" not in name:
            raise ValueError(f"--gateway {spec!r}: a dns:/// name needs its port (dns:///NAME:PORT)")
        return [], name
    return items, None


async def resolve(name: str) -> list[str]:
    """host:port for every address `name` (NAME:PORT) resolves to, sorted; [] when it resolves to none."""
    host, _, port = name.rpartition(":")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        log.warning("could not resolve gateway name %s: %s", host, e)
        return []
    return sorted({f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for *_, (ip, *_) in infos})


class GatewayRegistrations:
    """A worker's registrations with every gateway it is given: each gateway routes on its own view of the workers,
    so a worker joins all of them (no shared database, no leader). One `GatewayRegistration` per address; with a
    `dns:///` name the set follows what the name resolves to (a new replica is joined, a vanished one left)."""

    def __init__(self, gateways: str, request: gateway_pb2.RegisterWorkerRequest,
                 load: Callable[[], common_pb2.WorkerLoad], refresh_s: float = DNS_REFRESH_S) -> None:
        self.addresses, self.dns_name = parse_gateways(gateways)
        self.request = request
        self.load = load
        self.refresh_s = refresh_s
        self._draining = False
        self._regs: dict[str, GatewayRegistration] = {}
        self._resolver: asyncio.Task | None = None

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = value
        for reg in self._regs.values():
            reg.draining = value

    async def start(self) -> None:
        if self.dns_name is None:
            await self._follow(self.addresses)
        else:
            self._resolver = asyncio.create_task(self._resolve_loop(), name="gateway-resolver")

    async def stop(self) -> None:
        if self._resolver is not None:
            self._resolver.cancel()
            await asyncio.gather(self._resolver, return_exceptions=True)
        regs, self._regs = list(self._regs.values()), {}
        await asyncio.gather(*(r.stop() for r in regs))

    async def _follow(self, addresses: list[str]) -> None:
        for gone in set(self._regs) - set(addresses):
            log.info("gateway %s is no longer listed: leaving it", gone)
            await self._regs.pop(gone).stop()
        for address in addresses:
            if address not in self._regs:
                request = gateway_pb2.RegisterWorkerRequest()
                request.CopyFrom(self.request)  # each registration fills in its own load
                reg = GatewayRegistration(address, request, self.load)
                reg.draining = self._draining
                self._regs[address] = reg
                await reg.start()

    async def _resolve_loop(self) -> None:
        while True:
            found = await resolve(self.dns_name)
            if found:  # a failed lookup keeps the gateways known so far
                await self._follow(found)
            await asyncio.sleep(self.refresh_s)
