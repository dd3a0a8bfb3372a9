"""The balancer's view of each EP group: a sliding window of its ranks' expert load, its placement, and
the decision to move experts.

Legend: L MoE layers, E logical experts, P physical slots, R EP ranks.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from moemesh.ep.placement import ExpertPlacement
from moemesh.services.eplb.balance import balancedness, moved_slots
from moemesh.services.eplb.policies import DEFAULT as DEFAULT_POLICY
from moemesh.services.eplb.rebalance import rebalance

log = logging.getLogger(__name__)

Key = tuple[str, int]  # (instance_id, role)


@dataclass(frozen=True)
class Policy:
    """When to move experts."""

    window_s: float = 60.0          # load older than this is forgotten
    period_s: float = 30.0          # at most one rebalance per group per period
    min_gain: float = 0.05          # mean balancedness must rise by at least this much
    min_tokens: int = 1000          # routed (token, expert) pairs in the window before deciding anything
    policy: str = DEFAULT_POLICY    # the algorithm's policy, by name (moemesh.services.eplb.policies)


@dataclass
class Shape:
    num_layers: int
    num_logical: int
    num_physical: int
    ep_size: int
    num_groups: int
    num_nodes: int


@dataclass
class PlacementVersion:
    version: int
    phy2log: torch.Tensor            # [L, P] int64
    previous_balancedness: float = 0.0
    expected_balancedness: float = 0.0
    num_moved_slots: int = 0


@dataclass
class Group:
    """One EP group (instance, role) as the balancer sees it."""

    shape: Shape
    placement: PlacementVersion
    windows: deque = field(default_factory=deque)  # (unix time of the window's end, counts [L, E] int64)
    last_decision: float = field(default_factory=time.monotonic)

    def add(self, t_end: float, counts: torch.Tensor, window_s: float) -> None:
        self.windows.append((t_end, counts))
        while self.windows and self.windows[0][0] < t_end - window_s:
            self.windows.popleft()

    def load(self) -> torch.Tensor:
        """[L, E] int64: tokens routed per (layer, expert) over the window, all ranks."""
        total = torch.zeros(self.shape.num_layers, self.shape.num_logical, dtype=torch.int64)
        for _, counts in self.windows:
            total += counts
        return total

    def balancedness(self) -> torch.Tensor:
        """[L] float64 of the window's load under the current placement."""
        return balancedness(self.load(), self.placement.phy2log, self.shape.ep_size)


class Balancer:
    """Every group's load and placement; `decide` proposes new placements. Not thread-safe: one event loop."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.groups: dict[Key, Group] = {}

    def report(self, key: Key, shape: Shape, version: int, phy2log: torch.Tensor | None, t_end: float,
               counts: torch.Tensor) -> None:
        """A rank's window: counts [L, E]; `phy2log` [L, P] when the rank sent its placement along."""
        group = self.groups.get(key)
        if group is None or group.shape != shape:
            if phy2log is None:
                # A balancer that restarted meets a rank mid-stream: the rank resends its placement
                # on its next stream; until then, assume the start-up one.
                phy2log = ExpertPlacement.default(shape.num_layers, shape.num_logical, shape.ep_size,
                                                  shape.num_physical - shape.num_logical).phy2log
            group = Group(shape, PlacementVersion(version, phy2log.long()))
            self.groups[key] = group
            log.info("tracking EP group %s (%d ranks, %d slots per layer) at placement version %d",
                     key[0], shape.ep_size, shape.num_physical, version)
        elif phy2log is not None and (version > group.placement.version or (
                version == group.placement.version and not torch.equal(phy2log, group.placement.phy2log))):
            # A newer placement, or the real one of a version the balancer could only assume so far.
            group.placement = PlacementVersion(version, phy2log.long())
        if version == group.placement.version:
            group.add(t_end, counts, self.policy.window_s)
        # Windows served with an older placement no longer describe what the group runs: dropped.

    def decide(self, key: Key, now: float | None = None) -> PlacementVersion | None:
        """A better placement for the group, or None (too soon, too little load, or too little gain)."""
        group = self.groups[key]
        now = time.monotonic() if now is None else now
        if now - group.last_decision < self.policy.period_s:
            return None
        load = group.load()
        if int(load.sum()) < self.policy.min_tokens:
            return None
        group.last_decision = now
        s = group.shape
        current = group.placement.phy2log
        new = rebalance(load, s.num_physical, s.num_groups, s.num_nodes, s.ep_size, self.policy.policy,
                        previous=current).phy2log
        before = float(balancedness(load, current, s.ep_size).mean())
        after = float(balancedness(load, new, s.ep_size).mean())
        if after - before < self.policy.min_gain:
            log.info("EP group %s: balancedness %.3f, a new placement would give %.3f: kept", key[0], before, after)
            return None
        proposal = PlacementVersion(group.placement.version + 1, new, before, after,
                                    int(moved_slots(current, new).sum()))
        group.placement = proposal
        group.windows.clear()  # the new placement is judged on the load it serves
        log.info("EP group %s: placement %d, balancedness %.3f -> %.3f, %d expert slots move", key[0],
                 proposal.version, before, after, proposal.num_moved_slots)
        return proposal
