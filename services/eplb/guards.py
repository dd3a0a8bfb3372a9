"""What moemesh puts around DeepSeek's EPLB algorithm (`moemesh.services.eplb.rebalance`): the inputs it accepts,
checked with errors that say what is wrong, and a guard on its answer (never worse balanced than the trivial
placement).

Legend: L MoE layers, E logical experts, G expert groups, N nodes, R EP ranks, P physical slots.
"""

from __future__ import annotations

import torch

from moemesh.ep.placement import ExpertPlacement
from moemesh.services.eplb.balance import balancedness


class RebalanceError(ValueError):
    """Arguments the balancer cannot work with (shapes, counts that do not divide)."""


def check_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight [L, E] (a tensor or nested lists, any real dtype) -> weight [L, E] float64 on the CPU, or
    RebalanceError when it is not a finite, non-negative [L, E] table."""
    if not isinstance(weight, torch.Tensor):
        try:
            weight = torch.as_tensor(weight, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise RebalanceError(f"weight must be an [L, E] table of numbers: {e}") from None
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] < 1:
        raise RebalanceError(f"weight must be [L, E] (layers x logical experts), got shape {tuple(weight.shape)}")
    if weight.dtype == torch.bool or weight.is_complex():
        raise RebalanceError(f"weight must be real numbers, got dtype {weight.dtype}")
    weight = weight.detach().to("cpu", torch.float64)
    if not torch.isfinite(weight).all() or (weight < 0).any():
        raise RebalanceError("weight must be finite and >= 0")
    return weight


def check_shape(num_logical: int, num_physical: int, num_groups: int, num_nodes: int, num_ranks: int) -> None:
    """RebalanceError unless E experts fit P slots, R ranks share P evenly, G divides E and N divides R."""
    for name, value in (("num_physical", num_physical), ("num_groups", num_groups), ("num_nodes", num_nodes),
                        ("num_ranks", num_ranks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RebalanceError(f"{name} must be a positive int, got {value!r}")
    if num_physical < num_logical:
        raise RebalanceError(f"num_physical = {num_physical} slots cannot hold the {num_logical} logical experts")
    if num_physical % num_ranks:
        raise RebalanceError(f"num_physical = {num_physical} is not divisible by num_ranks = {num_ranks}; "
                             f"every rank must hold the same number of slots")
    if num_logical % num_groups:
        raise RebalanceError(f"num_groups = {num_groups} does not divide the {num_logical} logical experts")
    if num_ranks % num_nodes:
        raise RebalanceError(f"num_nodes = {num_nodes} does not divide num_ranks = {num_ranks}")


def never_worse_than_trivial(weight: torch.Tensor, phy2log: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """weight [L, E] float64, phy2log [L, P] int64 -> phy2log [L, P] int64 where every layer that `phy2log`
    balances worse than the trivial placement (`ExpertPlacement.default`) has the trivial one instead.

    Greedy packing is a heuristic, and on some loads the experts in order balance better."""
    num_layers, num_logical = weight.shape
    trivial = ExpertPlacement.default(num_layers, num_logical, num_ranks, phy2log.shape[1] - num_logical).phy2log
    worse = balancedness(weight, phy2log, num_ranks) < balancedness(weight, trivial, num_ranks)
    return torch.where(worse.unsqueeze(1), trivial, phy2log)
