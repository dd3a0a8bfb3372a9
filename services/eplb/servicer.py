"""The Eplb gRPC service: expert-load windows in, placements out (to every watcher of a group)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import torch
from prometheus_client import Counter, Gauge

from moemesh.ep.placement import ExpertPlacement, PlacementError
from moemesh.service.errors import InvalidArgument, NotFound
from moemesh.service.version import check_protocol_version
from moemesh.services.eplb.state import Balancer, Key, PlacementVersion, Shape
from moemesh.v1 import common_pb2, eplb_pb2, eplb_pb2_grpc

log = logging.getLogger(__name__)

# Bounds on what one report may claim: DeepSeek-V3 has 58 MoE layers, 256 experts, and groups of up to a
# few hundred ranks; anything far beyond is a malformed message, not a model.
MAX_LAYERS, MAX_EXPERTS, MAX_SLOTS, MAX_RANKS = 1024, 4096, 16384, 4096

BALANCEDNESS = Gauge("moemesh_eplb_balancedness",
                     "Balancedness of each MoE layer's recent load under the group's placement (mean over max "
                     "of the per-rank load; 1.0 is even).", ["instance", "role", "layer"])
MEAN_BALANCEDNESS = Gauge("moemesh_eplb_mean_balancedness", "Mean balancedness over the group's MoE layers.",
                          ["instance", "role"])
PLACEMENT_VERSION = Gauge("moemesh_eplb_placement_version", "The group's current placement version.",
                          ["instance", "role"])
REBALANCES = Counter("moemesh_eplb_rebalances_total", "New placements published.", ["instance", "role"])
MOVED_SLOTS = Counter("moemesh_eplb_moved_slots_total", "Expert slots whose weights new placements moved.",
                      ["instance", "role"])


def placement_pb(p: PlacementVersion, ep_size: int) -> eplb_pb2.Placement:
    num_layers, num_physical = p.phy2log.shape
    return eplb_pb2.Placement(
        version=p.version, num_layers=num_layers, num_physical_experts=num_physical,
        phy2log=p.phy2log.reshape(-1).tolist(), ep_size=ep_size, previous_balancedness=p.previous_balancedness,
        expected_balancedness=p.expected_balancedness, num_moved_slots=p.num_moved_slots)


def _role(role: int) -> str:
    return common_pb2.WorkerRole.Name(role).removeprefix("WORKER_ROLE_").lower() if role in (1, 2) else str(role)


def parse_report(r: eplb_pb2.ExpertLoadReport) -> tuple[Key, Shape, torch.Tensor, torch.Tensor | None]:
    """The report's group, shape, counts [L, E] int64 and placement [L, P] int64 (None if not sent)."""
    check_protocol_version(r.protocol_version, "the reporting rank")
    if not r.instance_id:
        raise InvalidArgument("instance_id: required")
    if r.role not in (common_pb2.WORKER_ROLE_PREFILL, common_pb2.WORKER_ROLE_DECODE):
        raise InvalidArgument(f"role: must be WORKER_ROLE_PREFILL or WORKER_ROLE_DECODE, got {r.role}")
    shape = Shape(r.num_layers, r.num_logical_experts, r.num_physical_experts, r.ep_size,
                  max(r.num_expert_groups, 1), max(r.num_nodes, 1))
    for name, value, top in (("num_layers", shape.num_layers, MAX_LAYERS),
                             ("num_logical_experts", shape.num_logical, MAX_EXPERTS),
                             ("num_physical_experts", shape.num_physical, MAX_SLOTS),
                             ("ep_size", shape.ep_size, MAX_RANKS)):
        if not 1 <= value <= top:
            raise InvalidArgument(f"{name}: must be in [1, {top}], got {value}")
    if shape.num_physical < shape.num_logical or shape.num_physical % shape.ep_size:
        raise InvalidArgument(f"num_physical_experts {shape.num_physical} must be >= num_logical_experts "
                              f"{shape.num_logical} and divisible by ep_size {shape.ep_size}")
    if shape.num_logical % shape.num_groups or shape.ep_size % shape.num_nodes:
        raise InvalidArgument(f"num_expert_groups {shape.num_groups} must divide the experts and num_nodes "
                              f"{shape.num_nodes} the ranks")
    if r.ep_rank >= shape.ep_size:
        raise InvalidArgument(f"ep_rank: must be below ep_size {shape.ep_size}, got {r.ep_rank}")
    if len(r.token_counts) != shape.num_layers * shape.num_logical:
        raise InvalidArgument(f"token_counts: expected num_layers x num_logical_experts = "
                              f"{shape.num_layers * shape.num_logical} values, got {len(r.token_counts)}")
    if any(c >= 2**62 for c in r.token_counts):
        raise InvalidArgument("token_counts: implausibly large")
    counts = torch.tensor(list(r.token_counts), dtype=torch.int64).view(shape.num_layers, shape.num_logical)
    phy2log = None
    if r.phy2log:
        if len(r.phy2log) != shape.num_layers * shape.num_physical:
            raise InvalidArgument(f"phy2log: expected num_layers x num_physical_experts = "
                                  f"{shape.num_layers * shape.num_physical} values, got {len(r.phy2log)}")
        phy2log = torch.tensor(list(r.phy2log), dtype=torch.int64).view(shape.num_layers, shape.num_physical)
        try:  # every expert needs a slot: the balancer measures and moves against this placement
            ExpertPlacement(phy2log, shape.ep_size, shape.num_logical)
        except PlacementError as e:
            raise InvalidArgument(f"phy2log: {e}") from None
    return (r.instance_id, r.role), shape, counts, phy2log


class EplbServicer(eplb_pb2_grpc.EplbServicer):
    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer
        self._watchers: dict[Key, set[asyncio.Queue]] = {}

    async def ReportExpertLoad(self, request_iterator: AsyncIterator[eplb_pb2.ExpertLoadReport],
                               context: grpc.aio.ServicerContext) -> eplb_pb2.ReportExpertLoadResponse:
        n = 0
        async for report in request_iterator:
            key, shape, counts, phy2log = parse_report(report)
            self.balancer.report(key, shape, report.placement_version, phy2log,
                                 report.window_end_unix_ms / 1000, counts)
            self._export(key)
            n += 1
        return eplb_pb2.ReportExpertLoadResponse(num_reports=n)

    async def GetPlacement(self, request: eplb_pb2.GetPlacementRequest, context: grpc.aio.ServicerContext
                           ) -> eplb_pb2.Placement:
        group = self.balancer.groups.get((request.instance_id, request.role))
        if group is None:
            raise NotFound(f"no EP group {request.instance_id!r} ({_role(request.role)}) has reported")
        return placement_pb(group.placement, group.shape.ep_size)

    async def WatchPlacement(self, request: eplb_pb2.GetPlacementRequest, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[eplb_pb2.Placement]:
        """Placements the balancer publishes for the group from now on (plus its current one, if it moved
        experts already: a rank that reconnects catches up)."""
        key = (request.instance_id, request.role)
        q: asyncio.Queue = asyncio.Queue()
        self._watchers.setdefault(key, set()).add(q)
        try:
            group = self.balancer.groups.get(key)
            if group is not None and group.placement.version > 0:
                yield placement_pb(group.placement, group.shape.ep_size)
            while True:
                yield await q.get()
        finally:
            self._watchers[key].discard(q)

    async def run(self, tick_s: float = 1.0) -> None:
        """Decide for every group each tick; publish what changes."""
        while True:
            await asyncio.sleep(tick_s)
            for key in list(self.balancer.groups):
                try:
                    proposal = self.balancer.decide(key)
                except ValueError:
                    log.exception("rebalancing %s failed", key[0])
                    continue
                if proposal is None:
                    continue
                instance, role = key[0], _role(key[1])
                REBALANCES.labels(instance, role).inc()
                MOVED_SLOTS.labels(instance, role).inc(proposal.num_moved_slots)
                msg = placement_pb(proposal, self.balancer.groups[key].shape.ep_size)
                for q in self._watchers.get(key, ()):
                    q.put_nowait(msg)
                self._export(key)

    def _export(self, key: Key) -> None:
        group = self.balancer.groups[key]
        instance, role = key[0], _role(key[1])
        PLACEMENT_VERSION.labels(instance, role).set(group.placement.version)
        if not group.windows:
            return
        values = group.balancedness().tolist()
        for layer, value in enumerate(values):
            BALANCEDNESS.labels(instance, role, str(layer)).set(value)
        MEAN_BALANCEDNESS.labels(instance, role).set(sum(values) / len(values))
