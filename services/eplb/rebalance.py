"""The expert-parallel load balancer: which logical expert each physical slot holds, from a load per expert.

Legend: L MoE layers, E logical experts, G expert groups, N nodes, R EP ranks, P physical slots
(E plus redundant replicas), S = P/R slots per rank. Rank r holds slots [r*S, (r+1)*S), node n holds
ranks [n*R/N, (n+1)*R/N), as in `moemesh.ep.placement`.

`rebalance` is the entry: a policy by name, DeepSeek's EPLB algorithm (github.com/deepseek-ai/EPLB), then
moemesh's additions, each in its own place:
- the algorithm, kept next to the reference's eplb.py in names, arguments, results and structure (the section
  "DeepSeek's EPLB" below), so that its published example comes out slot for slot: hierarchical (the expert
  groups divide evenly over the nodes): pack groups onto nodes, so that group-limited routing crosses few nodes;
  give the redundant slots of each node to its heaviest experts; pack the node's replicas onto its ranks.
  Global: the same with one group and one node. Packing is greedy (heaviest item first, onto the lightest rank
  that still has room, the lowest index on ties);
- `moemesh.services.eplb.guards`: the arguments checked (`RebalanceError`), and a layer that would come out worse
  balanced than the trivial placement keeps the trivial one;
- `moemesh.services.eplb.placement_moves`: given the placement in use, the slots are permuted so that as many as
  possible keep the expert they hold, or the old placement is kept where it balances within a tolerance as well;
- `moemesh.services.eplb.refined`: the default policy, "refined": this algorithm's placement improved by a local
  search (`moemesh.services.eplb.local_search`) within the same constraints, kept per layer only where it balances
  strictly better.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from moemesh.ep.placement import ExpertPlacement
from moemesh.services.eplb.guards import RebalanceError, check_shape, check_weight, never_worse_than_trivial
from moemesh.services.eplb.placement_moves import minimize_moves
from moemesh.services.eplb.policies import DEFAULT as DEFAULT_POLICY
from moemesh.services.eplb.policies import POLICIES


class Rebalanced(NamedTuple):
    """phy2log [L, P] int64; log2phy [L, E, max replicas] int64, each expert's slots in increasing order, padded
    with -1; logcnt [L, E] int64 replicas per expert (>= 1)."""

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor


def resolve_policy(policy: str, num_groups: int, num_nodes: int) -> str:
    """"auto" -> "hierarchical" when the G groups divide evenly over the N nodes, else "global"; "refined" ->
    "refined-hierarchical" or "refined-global" the same way. Other names are checked and returned as they are."""
    if policy not in POLICIES:
        raise RebalanceError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    for name, value in (("num_groups", num_groups), ("num_nodes", num_nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RebalanceError(f"{name} must be a positive int, got {value!r}")
    even = num_groups % num_nodes == 0
    if policy in ("auto", "refined"):
        prefix = "" if policy == "auto" else "refined-"
        return prefix + ("hierarchical" if even else "global")
    if is_hierarchical(policy) and not even:
        raise RebalanceError(f"the {policy} policy needs num_groups = {num_groups} to be divisible by "
                             f"num_nodes = {num_nodes}; use --policy {policy.replace('hierarchical', 'global')}")
    return policy


def is_hierarchical(policy: str) -> bool:
    """Whether a resolved policy keeps each expert group's replicas on one node (the nodes' ranks stay together)."""
    return policy in ("hierarchical", "refined-hierarchical")


# The policies `moemesh.services.eplb.policies` registers: weight [L, E] float64 -> phy2log [L, P] int64.
def place_hierarchical(weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int,
                       num_ranks: int) -> torch.Tensor:
    return rebalance_experts_hierarchical(weight, num_physical, num_groups, num_nodes, num_ranks)[0]


def place_global(weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int,
                 num_ranks: int) -> torch.Tensor:
    return rebalance_experts_hierarchical(weight, num_physical, 1, 1, num_ranks)[0]  # global: G = N = 1


def place_auto(weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int,
               num_ranks: int) -> torch.Tensor:
    policy = resolve_policy("auto", num_groups, num_nodes)
    return POLICIES.load(policy)(weight, num_physical, num_groups, num_nodes, num_ranks)


def rebalance(weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_ranks: int,
              policy: str = DEFAULT_POLICY, previous: torch.Tensor | None = None,
              tolerance: float = 0.01) -> Rebalanced:
    """A placement of E logical experts on P physical slots over R ranks that balances `weight`.

    weight [L, E] (any real dtype, >= 0): load per logical expert, e.g. tokens routed to it.
    num_physical: P, a multiple of num_ranks, >= E. num_groups: G, dividing E (DeepSeek's expert groups).
    num_nodes: N, dividing num_ranks. num_ranks: R, the EP size.
    policy: a name `moemesh.services.eplb.policies` registers (see `resolve_policy`): "refined" (the default:
        DeepSeek's placement improved by local search, never worse on any layer, `moemesh.services.eplb.refined`),
        "refined-hierarchical", "refined-global"; DeepSeek's own "auto", "hierarchical", "global".
    previous [L, P] int64: the placement in use; when given, see `minimize_moves` (with `tolerance`).

    Every expert gets at least one slot and every rank exactly P/R; an expert's replicas sit on distinct ranks
    wherever the packing leaves the room. Returns `Rebalanced(phy2log, log2phy, logcnt)`.
    """
    weight = check_weight(weight)
    num_logical = weight.shape[1]
    check_shape(num_logical, num_physical, num_groups, num_nodes, num_ranks)
    policy = resolve_policy(policy, num_groups, num_nodes)
    phy2log = POLICIES.load(policy)(weight, num_physical, num_groups, num_nodes, num_ranks)
    phy2log = never_worse_than_trivial(weight, phy2log, num_ranks)
    if previous is not None:
        phy2log = minimize_moves(weight, phy2log, previous, num_ranks,
                                 num_nodes if is_hierarchical(policy) else 1, tolerance).phy2log
    placement = ExpertPlacement(phy2log, num_ranks, num_logical)
    return Rebalanced(placement.phy2log, placement.log2phy, placement.logcnt)


# ---- DeepSeek's EPLB ----------------------------------------------------------------------------------------------
# github.com/deepseek-ai/EPLB, eplb.py: the same four functions, arguments and results, in the same order, so the
# two read side by side. The differences, each marked "moemesh:" below: float64 loads and stable sorts (ties go to
# the lower index, on every platform), the packing's `labels`, the replication's tie-break, RebalanceError for
# arguments that do not fit instead of asserts.


def balanced_packing(weight: torch.Tensor, num_packs: int,
                     labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the n items of each row into `num_packs` packs of exactly n/num_packs items, balancing the packs' loads.

    weight [X, n] float64 -> (pack_index [X, n] int64 the pack of each item, rank_in_pack [X, n] int64 the item's
    place in its pack, in packing order). Greedy: heaviest item first, onto the lightest pack that still has room,
    the lower index on ties. With one item per pack the items keep their order (nothing to balance).
    moemesh: `labels` [X, n] (the expert a replica copies): a pack already holding an item with the same label is
    passed over while another has room, since two copies on one rank balance nothing that one could not.
    """
    num_layers, num_items = weight.shape
    items_per_pack = num_items // num_packs
    if items_per_pack == 1:
        return torch.arange(num_items).repeat(num_layers, 1), torch.zeros(num_layers, num_items, dtype=torch.int64)
    indices = torch.sort(weight, dim=1, descending=True, stable=True).indices.tolist()
    weights = weight.tolist()
    label_rows = labels.tolist() if labels is not None else [[-1 - i for i in range(num_items)]] * num_layers
    pack_index = [[0] * num_items for _ in range(num_layers)]
    rank_in_pack = [[0] * num_items for _ in range(num_layers)]
    for i in range(num_layers):
        pack_weights, pack_items = [0.0] * num_packs, [0] * num_packs
        pack_labels: list[set[int]] = [set() for _ in range(num_packs)]
        w, lab = weights[i], label_rows[i]
        for item in indices[i]:
            pack, best = -1, (True, math.inf)
            for k in range(num_packs):
                if pack_items[k] < items_per_pack:
                    key = (lab[item] in pack_labels[k], pack_weights[k])
                    if key < best:
                        pack, best = k, key
            pack_index[i][item], rank_in_pack[i][item] = pack, pack_items[pack]
            pack_weights[pack] += w[item]
            pack_items[pack] += 1
            pack_labels[pack].add(lab[item])
    return torch.tensor(pack_index, dtype=torch.int64), torch.tensor(rank_in_pack, dtype=torch.int64)


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spread num_log experts over num_phy >= num_log replicas so that the largest load per replica is smallest.

    weight [X, num_log] float64 -> (phy2log [X, num_phy] int64 the expert of each replica, rank [X, num_phy] int64
    the replica's index among its expert's replicas, logcnt [X, num_log] int64 replicas per expert). Replicas
    0..num_log-1 are the experts in order; each further one goes to the expert with the largest load per replica.
    moemesh: ties go to the expert with fewer replicas, then the lower index, so a layer without load spreads its
    redundant replicas over the experts instead of piling them on expert 0.
    """
    n, num_log = weight.shape
    phy2log = torch.arange(num_phy).repeat(n, 1)
    rank = torch.zeros(n, num_phy, dtype=torch.int64)
    logcnt = torch.ones(n, num_log, dtype=torch.int64)
    arangen = torch.arange(n)
    for i in range(num_log, num_phy):
        per_replica = weight / logcnt
        tied = per_replica == per_replica.amax(1, keepdim=True)
        redundant_indices = torch.where(tied, logcnt, num_phy + 1).argmin(1)  # argmin: the first index on ties
        phy2log[:, i] = redundant_indices
        rank[:, i] = logcnt[arangen, redundant_indices]
        logcnt[arangen, redundant_indices] += 1
    return phy2log, rank, logcnt


def rebalance_experts_hierarchical(weight: torch.Tensor, num_physical_experts: int, num_groups: int, num_nodes: int,
                                   num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hierarchical policy (the global one is G = N = 1): weight [L, E] float64 -> (phy2log [L, P] int64 the
    expert of each slot, phyrank [L, P] int64 the slot's index among its expert's replicas, logcnt [L, E] int64).

    num_physical_experts: P. num_groups: G, dividing E. num_nodes: N, dividing G and num_gpus. num_gpus: R, the
    EP ranks (callers check these: `check_shape`). Three steps: the expert groups onto nodes (group-limited
    routing then crosses few nodes); each node's redundant slots to its heaviest experts; each node's replicas
    onto its ranks, each carrying an equal share of its expert's load. Experts are renumbered node-major in
    between ("mlog": node n holds mlog [n*E/N, (n+1)*E/N), its groups in packing order), and so are slots
    ("phy": a replica in its node's list, "pphy": the final slot).
    """
    num_layers, num_logical_experts = weight.shape
    group_size = num_logical_experts // num_groups
    groups_per_node = num_groups // num_nodes
    phy_experts_per_gpu = num_physical_experts // num_gpus

    # Step 1: the groups onto nodes.
    tokens_per_group = weight.view(num_layers, num_groups, group_size).sum(-1)  # [L, G]
    group_pack_index, group_rank_in_pack = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (((group_pack_index * groups_per_node + group_rank_in_pack) * group_size).unsqueeze(-1)
                + torch.arange(group_size)).flatten(-2)  # [L, E]
    mlog2log = _inverse(log2mlog)

    # Step 2: redundant replicas within each node; one row per (layer, node) from here on.
    tokens_per_mlog = weight.gather(-1, mlog2log).view(-1, num_logical_experts // num_nodes)  # [L*N, E/N]
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_physical_experts // num_nodes)

    # Step 3: each node's replicas onto its ranks; moemesh: a rank is labelled with the experts it holds.
    tokens_per_phy = (tokens_per_mlog / mlogcnt).gather(-1, phy2mlog)  # [L*N, P/N]
    pack_index, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes, labels=phy2mlog)
    phy2pphy = pack_index * phy_experts_per_gpu + rank_in_pack
    pphy2phy = _inverse(phy2pphy)

    pphy2mlog = phy2mlog.gather(-1, pphy2phy)  # [L*N, P/N] node-local mlog of each slot
    node_base = torch.arange(0, num_logical_experts, num_logical_experts // num_nodes).view(1, -1, 1)
    pphy2mlog = (pphy2mlog.view(num_layers, num_nodes, -1) + node_base).flatten(-2)  # [L, P]
    pphy2log = mlog2log.gather(-1, pphy2mlog)
    pphyrank = phyrank.gather(-1, pphy2phy).view(num_layers, -1)
    logcnt = mlogcnt.view(num_layers, -1).gather(-1, log2mlog)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's entry: hierarchical when the G groups divide evenly over the N nodes, else global.

    weight [L, E] (any real dtype, >= 0) load per logical expert. num_replicas: P, a multiple of num_gpus, >= E.
    num_groups: G. num_nodes: N. num_gpus: R, the EP ranks, a multiple of N.
    Returns (phy2log [L, P] int64 the expert of each slot, log2phy [L, E, max replicas] int64 each expert's slots
    in replica order, padded with -1, logcnt [L, E] int64 replicas per expert).
    moemesh: `rebalance` is the entry the project uses: a policy by name, the trivial placement where it balances
    better, few moves from the placement in use, log2phy in slot order.
    """
    weight = check_weight(weight)
    num_layers, num_logical_experts = weight.shape
    check_shape(num_logical_experts, num_replicas, num_groups, num_nodes, num_gpus)
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, num_groups, num_nodes,
                                                                  num_gpus)
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    maxlogcnt = int(logcnt.max())
    log2phy = torch.full((num_layers, num_logical_experts, maxlogcnt), -1, dtype=torch.int64)
    log2phy.view(num_layers, -1).scatter_(-1, phy2log * maxlogcnt + phyrank,
                                          torch.arange(num_replicas).expand(num_layers, -1))
    return phy2log, log2phy, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """perm [X, n] int64, each row a permutation -> its inverse [X, n] int64."""
    return torch.empty_like(perm).scatter_(1, perm, torch.arange(perm.shape[1]).expand_as(perm))

