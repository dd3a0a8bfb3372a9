"""How well a placement balances a load, and how many expert weights a change of placement moves.

Legend: L MoE layers, E logical experts, P physical slots, R EP ranks (rank r holds slots
[r * P/R, (r+1) * P/R), as in `moemesh.ep.placement`).

The dispatcher spreads an expert's tokens evenly over its replicas, so an expert's load is split evenly
over its slots here too.
"""

from __future__ import annotations

import torch


def rank_loads(weight: torch.Tensor, phy2log: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """weight [L, E] load per logical expert (any real dtype), phy2log [L, P] int64 -> [L, R] float64 load per rank.

    Each slot carries weight[l, e] / (number of slots of e in layer l).
    """
    if weight.dim() != 2 or phy2log.dim() != 2 or weight.shape[0] != phy2log.shape[0]:
        raise ValueError(f"weight [L, E] and phy2log [L, P] must agree on L, got shapes "
                         f"{tuple(weight.shape)} and {tuple(phy2log.shape)}")
    num_layers, num_physical = phy2log.shape
    if num_ranks < 1 or num_physical % num_ranks:
        raise ValueError(f"num_physical = {num_physical} slots is not divisible by num_ranks = {num_ranks}")
    weight = weight.double()
    phy2log = phy2log.long()
    if phy2log.numel() and not 0 <= int(phy2log.min()) <= int(phy2log.max()) < weight.shape[1]:
        raise ValueError(f"phy2log values must lie in [0, {weight.shape[1]}) for E = {weight.shape[1]} experts")
    replicas = torch.zeros_like(weight)
    replicas.scatter_add_(1, phy2log, torch.ones_like(phy2log, dtype=torch.float64))
    slot_load = (weight / replicas.clamp(min=1)).gather(1, phy2log)  # [L, P]
    return slot_load.view(num_layers, num_ranks, num_physical // num_ranks).sum(-1)


def balancedness(weight: torch.Tensor, phy2log: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """weight [L, E], phy2log [L, P] int64 -> [L] float64: mean over max of the per-rank load; 1.0 is perfect.

    A layer without load counts as balanced (1.0). For the contiguous placement with P == E this equals
    `moemesh.telemetry.expert_load.balancedness(weight, num_ranks)`.
    """
    loads = rank_loads(weight, phy2log, num_ranks)
    top = loads.amax(-1)
    return torch.where(top > 0, loads.mean(-1) / torch.where(top > 0, top, 1.0), torch.ones_like(top))


def moved_slots(old_phy2log: torch.Tensor, new_phy2log: torch.Tensor) -> torch.Tensor:
    """old, new phy2log [L, P] int64 -> [L] int64: slots whose expert changes, i.e. expert weights to transfer."""
    if old_phy2log.shape != new_phy2log.shape:
        raise ValueError(f"placements differ in shape: {tuple(old_phy2log.shape)} vs {tuple(new_phy2log.shape)}")
    return (old_phy2log.long() != new_phy2log.long()).sum(-1)
