"""kvtransfer assembled: rooms, relay, servicer and sweeper inside a `GrpcServer`, with start and stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from moemesh.service.server import GrpcServer
from moemesh.services.kvtransfer.config import KvTransferConfig
from moemesh.services.kvtransfer.relay import Relay
from moemesh.services.kvtransfer.rooms import RoomRegistry
from moemesh.services.kvtransfer.servicer import KvTransferServicer
from moemesh.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = kvtransfer_pb2.DESCRIPTOR.services_by_name["KvTransfer"].full_name


class KvTransferService:
    """One kvtransfer server. `await start()` binds and turns health SERVING; `await stop()` drains.

    Usage: `svc = KvTransferService(cfg); port = await svc.start(); ...; await svc.stop()`.
    """

    def __init__(self, cfg: KvTransferConfig) -> None:
        self.cfg = cfg
        self.rooms = RoomRegistry(
            default_lease_ms=cfg.default_lease_ms, max_lease_ms=cfg.max_lease_ms,
            default_wait_ms=cfg.default_wait_ms, max_wait_ms=cfg.max_wait_ms,
            retention_s=cfg.retention_s, max_rooms=cfg.max_rooms)
        self.relay = Relay(self.rooms, queue_chunks=cfg.relay_queue_chunks,
                           room_max_bytes=cfg.relay_room_max_bytes, total_max_bytes=cfg.relay_total_max_bytes)
        self.server = GrpcServer(cfg.host, cfg.port)
        self.server.add(kvtransfer_pb2_grpc.add_KvTransferServicer_to_server,
                        KvTransferServicer(self.rooms, self.relay), SERVICE_NAME)
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port (known after `start`)."""
        return self.server.port

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> int:
        """Bind, start serving and sweeping, then report SERVING; returns the bound port."""
        port = await self.server.start()
        self._sweeper = asyncio.create_task(self.rooms.run_sweeper(self.cfg.sweep_interval_s),
                                            name="kvtransfer-sweeper")
        await self.server.set_serving(True)
        log.info("kvtransfer serving on %s", self.address)
        return port

    async def stop(self) -> None:
        """Drain, then stop.

        Health turns NOT_SERVING and new rooms are refused, while live rooms get up to `drain_s` to
        finish. Rooms live only in this process and cannot outlive it: the ones left then fail with
        a clear UNAVAILABLE (waking their waiters and streams) rather than be cancelled without a
        reason at the end of the grace period.
        """
        await self.server.set_serving(False)
        self.rooms.stop_admitting()
        if not await self.rooms.wait_idle(self.cfg.drain_s):
            log.warning("kvtransfer stopping with %d live rooms", self.rooms.live_rooms())
        self.rooms.close()
        await self.server.stop(self.cfg.shutdown_grace_s)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        log.info("kvtransfer stopped")
