"""The refined policies: DeepSeek's placement, then improved by local search, never worse on any layer.

`refined-hierarchical` keeps DeepSeek's expert groups on the nodes it packs them onto and its replica counts as a
start, then improves each node's packing on its own (`moemesh.services.eplb.local_search`: swaps between its ranks,
and re-splits that move a replica from one of its experts to another), so group-to-node locality holds. `refined-
global` does the same over all ranks as one node. `refined` picks between them as "auto" does.

Per layer, the refined placement is kept only where it balances strictly better than DeepSeek's; elsewhere
DeepSeek's stays, slot for slot. So on every layer the policy is at least as good as the reference by construction,
whatever the search does.

Legend: L MoE layers, E logical experts, G expert groups, N nodes, R EP ranks, P physical slots (rank r holds slots
[r*P/R, (r+1)*P/R), node n holds ranks [n*R/N, (n+1)*R/N)).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from moemesh.services.eplb.balance import balancedness
from moemesh.services.eplb.local_search import improve_packing
from moemesh.services.eplb.rebalance import rebalance_experts_hierarchical, resolve_policy

# Moves per row at most, which bounds the run time (a step costs about 1-2 ms at 61 layers x 288 slots on 72
# ranks). The search stops by itself well before on the loads measured (`moemesh bench eplb-policy`: the same
# placements with a bound of 128 as of 4096 at Zipf exponents 0.4-1.2, but for one layer in 30 at 64).
MAX_STEPS = 256


def place_refined_hierarchical(weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int,
                               num_ranks: int) -> torch.Tensor:
    """weight [L, E] float64 -> phy2log [L, P] int64: DeepSeek's hierarchical placement, refined within each node."""
    start = rebalance_experts_hierarchical(weight, num_physical, num_groups, num_nodes, num_ranks)[0]
    return refine(weight, start, num_nodes, num_ranks)


def place_refined_global(weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int,
                         num_ranks: int) -> torch.Tensor:
    """weight [L, E] float64 -> phy2log [L, P] int64: DeepSeek's global placement (G = N = 1), refined."""
    start = rebalance_experts_hierarchical(weight, num_physical, 1, 1, num_ranks)[0]
    return refine(weight, start, 1, num_ranks)


def place_refined(weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int,
                  num_ranks: int) -> torch.Tensor:
    """weight [L, E] float64 -> phy2log [L, P] int64: refined-hierarchical when the G groups divide evenly over the
    N nodes, else refined-global."""
    place = (place_refined_hierarchical if resolve_policy("refined", num_groups, num_nodes) == "refined-hierarchical"
             else place_refined_global)
    return place(weight, num_physical, num_groups, num_nodes, num_ranks)


def refine(weight: torch.Tensor, phy2log: torch.Tensor, num_nodes: int, num_ranks: int,
           max_steps: int = MAX_STEPS) -> torch.Tensor:
    """weight [L, E] float64, phy2log [L, P] int64 -> phy2log [L, P] int64, each node's packing improved.

    Slots never leave their node (each node is searched on its own), every rank keeps P/R slots, every expert at
    least one replica, and no rank gets a second copy of an expert it holds. A layer keeps `phy2log` as it is
    unless the search balances it strictly better.
    """
    num_layers, num_physical = phy2log.shape
    rows = phy2log.reshape(num_layers * num_nodes, num_physical // num_nodes)  # [L*N, P/N]: one row per node
    with _one_thread():
        searched = improve_packing(weight.repeat_interleave(num_nodes, 0), rows, num_ranks // num_nodes, max_steps)
    return keep_better(weight, phy2log, searched.view(num_layers, num_physical), num_ranks)


def keep_better(weight: torch.Tensor, reference: torch.Tensor, candidate: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """weight [L, E]; reference, candidate [L, P] int64 -> [L, P] int64: per layer, `candidate` where it balances
    strictly better than `reference`, else `reference`."""
    better = balancedness(weight, candidate, num_ranks) > balancedness(weight, reference, num_ranks)
    return torch.where(better.unsqueeze(1), candidate, reference)


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch's intra-op threads limited to one while the search runs. Its tensors are small (about 1e5 elements an
    op) and it runs hundreds of ops in a row: splitting each over threads costs more in hand-offs than it saves, and
    far more when the cores are busy (61 layers x 288 slots on 72 ranks: 0.26 s on one thread, 0.7-2.0 s on two
    sharing two busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
