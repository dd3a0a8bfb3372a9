"""Offline replay of recorded expert loads: how balanced would a deployment be, with how many redundant slots.

The windows of a stats file (`moemesh.telemetry.expert_load_file`) are split in time: the first half is the history a
balancer would have seen, the second half the future it has to serve. For each redundant count the future load
is evaluated on three placements: the trivial one, one rebalanced from the history (what EPLB would deploy),
and one rebalanced from the future itself (an oracle: what the policy does knowing the future; the balancer is
a heuristic, so this is a reference, not a strict bound). The load per expert does not depend on how many ranks
recorded it, so a large deployment can be studied from a small one's records.

Legend: L MoE layers, E logical experts, R EP ranks, P = E + redundant physical slots.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moemesh.ep.placement import ExpertPlacement
from moemesh.services.eplb.balance import balancedness
from moemesh.services.eplb.policies import DEFAULT as DEFAULT_POLICY
from moemesh.services.eplb.rebalance import RebalanceError, rebalance, resolve_policy
from moemesh.telemetry.expert_load_file import Window


class SimulationError(ValueError):
    """Records or settings the simulation cannot use."""


@dataclass(frozen=True)
class SimRow:
    """Balancedness (mean over max per-rank load, 1.0 perfect) of the future load, per MoE layer [L] and its mean
    over layers, for one redundant count."""

    redundant: int
    num_physical: int
    trivial: list[float]
    rebalanced: list[float]
    oracle: list[float]

    def means(self) -> tuple[float, float, float]:
        return tuple(sum(v) / len(v) for v in (self.trivial, self.rebalanced, self.oracle))


@dataclass(frozen=True)
class Simulation:
    policy: str
    num_ranks: int
    num_groups: int
    num_nodes: int
    num_layers: int
    num_logical: int
    history_windows: int
    future_windows: int
    rows: list[SimRow]


def split_history(windows: Sequence[Window]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """windows -> (history [L, E], future [L, E] int64 summed counts, windows in each): the earlier half by t is
    the history."""
    if len(windows) < 2:
        raise SimulationError(f"need at least 2 windows to split into history and future, got {len(windows)}")
    ordered = sorted(windows, key=lambda w: w.t)
    half = len(ordered) // 2
    history = torch.stack([w.counts for w in ordered[:half]]).sum(0)
    future = torch.stack([w.counts for w in ordered[half:]]).sum(0)
    return history, future, half, len(ordered) - half


def simulate(windows: Sequence[Window], num_ranks: int, num_groups: int, num_nodes: int,
             redundant: Sequence[int], role: str | None = "decode", policy: str = DEFAULT_POLICY) -> Simulation:
    """Replay `windows` (only those of `role`, unless None) for each redundant slot count in `redundant`."""
    chosen = [w for w in windows if role is None or w.role == role]
    if not chosen:
        roles = sorted({w.role for w in windows})
        raise SimulationError(f"no windows with role {role!r} (the file has: {', '.join(roles) or 'none'})")
    history, future, n_history, n_future = split_history(chosen)
    num_layers, num_logical = future.shape
    try:
        resolved = resolve_policy(policy, num_groups, num_nodes)
    except RebalanceError as e:
        raise SimulationError(str(e)) from None
    rows = []
    for extra in redundant:
        if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
            raise SimulationError(f"redundant slot counts must be ints >= 0, got {extra!r}")
        num_physical = num_logical + extra
        try:
            from_history = rebalance(history, num_physical, num_groups, num_nodes, num_ranks, resolved).phy2log
            from_future = rebalance(future, num_physical, num_groups, num_nodes, num_ranks, resolved).phy2log
        except RebalanceError as e:
            raise SimulationError(f"redundant = {extra} (P = {num_logical} + {extra} = {num_physical}): {e}") from None
        trivial = ExpertPlacement.default(num_layers, num_logical, num_ranks, extra).phy2log
        rows.append(SimRow(extra, num_physical, *(balancedness(future, p, num_ranks).tolist()
                                                   for p in (trivial, from_history, from_future))))
    return Simulation(resolved, num_ranks, num_groups, num_nodes, num_layers, num_logical, n_history, n_future, rows)


def format_table(sim: Simulation) -> str:
    """The simulation as a text table: one row per redundant count, mean balancedness over layers."""
    lines = [f"{sim.history_windows} history + {sim.future_windows} future windows, {sim.num_layers} MoE layers x "
             f"{sim.num_logical} experts; {sim.policy} policy, {sim.num_ranks} ranks, {sim.num_groups} groups, "
             f"{sim.num_nodes} nodes",
             "balancedness of the future load (mean over max per-rank load, mean over layers; 1.0 is perfect)",
             f"{'redundant':>9} {'slots':>6} {'trivial':>8} {'rebalanced':>10} {'oracle':>8}"]
    for row in sim.rows:
        trivial, rebalanced, oracle = row.means()
        lines.append(f"{row.redundant:>9} {row.num_physical:>6} {trivial:>8.3f} {rebalanced:>10.3f} {oracle:>8.3f}")
    return "\n".join(lines)


def plot(sim: Simulation, path: str | os.PathLike) -> None:
    """Draw mean balancedness against redundant slots (trivial, rebalanced, oracle) into the PNG at `path`."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display, and no GUI toolkit to import
        import matplotlib.pyplot as plt
    except ImportError:
        raise SimulationError("drawing a PNG needs matplotlib: pip install 'moemesh[bench]'") from None
    xs = [row.redundant for row in sim.rows]
    series = list(zip(*(row.means() for row in sim.rows), strict=True))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    try:
        for values, label, style in zip(series, ("trivial", "rebalanced from history", "oracle (rebalanced on future)"),
                                        ("s--", "o-", "^:"), strict=True):
            ax.plot(xs, values, style, label=label)
        ax.set_xlabel("redundant expert slots")
        ax.set_ylabel("balancedness (mean / max rank load)")
        ax.set_ylim(0, 1.05)
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
        ax.set_title(f"EPLB {sim.policy}, {sim.num_ranks} ranks, {sim.num_logical} experts")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
