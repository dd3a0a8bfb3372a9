"""A worker's side of expert-parallel load balancing: expert load windows out (to the eplb service and/or a
file), placements in (watched from the eplb service and handed to the EP group).

Both loops survive the eplb service being away: they retry with backoff, and serving goes on with the
placement the group has.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
import torch

from moemesh.engine.async_engine import AsyncEngine
from moemesh.service.channel import CHANNEL_OPTIONS, mesh_channel
from moemesh.service.version import PROTOCOL_VERSION
from moemesh.telemetry.expert_load_file import append_window
from moemesh.v1 import common_pb2, eplb_pb2, eplb_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupIdentity:
    instance_id: str
    role: int          # common_pb2.WorkerRole
    rank: int
    num_nodes: int = 1


class ExpertLoadReporter:
    """Every `window_s`, the tokens this rank routed to each (MoE layer, expert) since the last window."""

    def __init__(self, engine: AsyncEngine, ident: GroupIdentity, eplb: str, record_file: str | None,
                 window_s: float = 1.0) -> None:
        self.engine = engine
        self.ident = ident
        self.eplb = eplb
        self.record_file = record_file
        self.window_s = window_s
        self.recorder = engine.engine.expert_load
        self._last = self.recorder.snapshot.clone()
        self._queue: asyncio.Queue[eplb_pb2.ExpertLoadReport] = asyncio.Queue(maxsize=64)

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_forever()) if self.eplb else None
        try:
            while True:
                await asyncio.sleep(self.window_s)
                start = time.time() - self.window_s
                counts = self.recorder.snapshot
                delta, self._last = counts - self._last, counts.clone()
                if not int(delta.sum()):
                    continue
                if self.record_file:
                    role = common_pb2.WorkerRole.Name(self.ident.role).removeprefix("WORKER_ROLE_").lower()
                    await asyncio.to_thread(append_window, self.record_file, delta, role, self.ident.instance_id,
                                            self.ident.rank)
                if sender is not None:
                    if self._queue.full():
                        self._queue.get_nowait()  # eplb away for a while: the oldest window goes
                    self._queue.put_nowait(self._report(delta, start))
        finally:
            if sender is not None:
                sender.cancel()

    def _report(self, delta: torch.Tensor, start: float) -> eplb_pb2.ExpertLoadReport:
        ep = self.engine.engine.ep
        num_layers, num_experts = delta.shape
        phy2log = ep.placement.phy2log if ep is not None else torch.arange(num_experts).repeat(num_layers, 1)
        groups = self.engine.engine.model.config.n_group or 1
        return eplb_pb2.ExpertLoadReport(
            protocol_version=PROTOCOL_VERSION, instance_id=self.ident.instance_id, role=self.ident.role,
            ep_rank=self.ident.rank, num_layers=num_layers, num_logical_experts=num_experts,
            token_counts=delta.reshape(-1).tolist(), window_start_unix_ms=int(start * 1000),
            window_end_unix_ms=int(time.time() * 1000),
            placement_version=ep.placement_version if ep is not None else 0,
            num_physical_experts=phy2log.shape[1], ep_size=ep.size if ep is not None else 1,
            num_expert_groups=groups if num_experts % groups == 0 else 1, num_nodes=self.ident.num_nodes,
            phy2log=phy2log.reshape(-1).tolist())

    async def _send_forever(self) -> None:
        """One client stream at a time. A report carries the rank's placement (L x P slots) only when the
        stream has not carried that version and those rows yet: a new stream's first report (so a restarted balancer
        learns what the group runs) and the first after a switch."""
        backoff = 0.5
        pending: eplb_pb2.ExpertLoadReport | None = None  # taken from the queue, not yet written
        while True:
            channel = mesh_channel(self.eplb, options=CHANNEL_OPTIONS)
            try:
                call = eplb_pb2_grpc.EplbStub(channel).ReportExpertLoad()
                sent_version: tuple[int, tuple[int, ...]] | None = None
                while True:
                    if pending is None:
                        pending = await self._queue.get()
                    out = pending
                    # The rows too: a switch given up part-way serves its version's number with other rows.
                    key = (pending.placement_version, tuple(pending.phy2log))
                    if key == sent_version:
                        out = eplb_pb2.ExpertLoadReport()
                        out.CopyFrom(pending)
                        del out.phy2log[:]
                    await call.write(out)
                    sent_version, pending = key, None
                    backoff = 0.5
            except grpc.aio.AioRpcError as e:
                log.info("expert load to eplb %s: %s; retrying", self.eplb, e.code().name)
            except asyncio.InvalidStateError:
                # How grpc.aio (with client interceptors) reports a write to a stream that already ended,
                # e.g. after the balancer restarted: a new stream, not the end of reporting.
                log.info("expert load to eplb %s: the stream ended; retrying", self.eplb)
            except asyncio.CancelledError:
                raise
            finally:
                await channel.close()
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, 10.0)


async def watch_placements(engine: AsyncEngine, ident: GroupIdentity, eplb: str) -> None:
    """Hand every placement the balancer publishes for this group to the EP group (until cancelled)."""
    backoff = 0.5
    req = eplb_pb2.GetPlacementRequest(instance_id=ident.instance_id, role=ident.role)
    while True:
        channel = mesh_channel(eplb, options=CHANNEL_OPTIONS)
        try:
            async for p in eplb_pb2_grpc.EplbStub(channel).WatchPlacement(req):
                backoff = 0.5
                phy2log = torch.tensor(list(p.phy2log), dtype=torch.int64).view(p.num_layers, p.num_physical_experts)
                try:
                    await engine.offer_placement(p.version, phy2log)
                    log.info("placement %d offered to the EP group (expected balancedness %.3f -> %.3f)",
                             p.version, p.previous_balancedness, p.expected_balancedness)
                except ValueError as e:
                    log.warning("placement %d from eplb refused: %s", p.version, e)
        except grpc.aio.AioRpcError as e:
            log.info("watching placements at eplb %s: %s; retrying", eplb, e.code().name)
        finally:
            await channel.close()
        await asyncio.sleep(backoff)
        backoff = min(2 * backoff, 10.0)
