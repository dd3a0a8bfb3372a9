"""The expert-parallel load balancer: which logical expert each physical slot holds, from a load per expert.

Legend: L MoE layers, E logical experts, G expert groups, N nodes, R EP ranks, P physical slots
(E plus redundant replicas), S = P/R slots per rank. Rank r holds slots [r*S, (r+1)*S), node n holds
ranks [n*R/N, (n+1)*R/N), as in `moemesh.ep.placement`.

Follows DeepSeek's EPLB (github.com/deepseek-ai/EPLB), with the same choices wherever it makes one, so that its
published example comes out slot for slot:
- hierarchical (the expert groups divide evenly over the nodes): pack groups onto nodes, so that group-limited
  routing crosses few nodes; give the redundant slots of each node to its heaviest experts; pack the node's
  replicas onto its ranks.
- global: give the redundant slots to the heaviest experts of the whole layer, pack all replicas onto all ranks.
Packing is greedy (heaviest item first, onto the lightest rank that still has room, the lowest index on ties).
Beyond the reference: a rank already holding a replica of the same expert is passed over when another has room
(two copies on one rank balance nothing that one could not); a layer without load spreads its redundant slots
over experts instead of piling them on expert 0; a layer that would come out worse balanced than the trivial
placement keeps the trivial one; and given the previous placement, the slots are permuted so that as many as
possible keep the expert they hold (`minimize_moves`).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import NamedTuple

import numpy as np
import torch

from moemesh.ep.placement import ExpertPlacement, PlacementError
from moemesh.services.eplb.balance import balancedness, moved_slots

POLICIES = ("auto", "hierarchical", "global")


class RebalanceError(ValueError):
    """Arguments the balancer cannot work with (shapes, counts that do not divide)."""


class Rebalanced(NamedTuple):
    """phy2log [L, P] int64; log2phy [L, E, max replicas] int64, each expert's slots in increasing order, padded
    with -1; logcnt [L, E] int64 replicas per expert (>= 1)."""

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor


class MoveReport(NamedTuple):
    """phy2log [L, P] int64 the placement to use; moved_before / moved_after [L] int64 slots that change expert
    going from the previous placement to the balancer's own answer / to `phy2log`; kept_previous [L] bool the
    layers where the previous placement balanced about as well and was kept as it was."""

    phy2log: torch.Tensor
    moved_before: torch.Tensor
    moved_after: torch.Tensor
    kept_previous: torch.Tensor


def resolve_policy(policy: str, num_groups: int, num_nodes: int) -> str:
    """"auto" -> "hierarchical" when the G groups divide evenly over the N nodes, else "global"."""
    if policy not in POLICIES:
        raise RebalanceError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    for name, value in (("num_groups", num_groups), ("num_nodes", num_nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RebalanceError(f"{name} must be a positive int, got {value!r}")
    if policy == "auto":
        return "hierarchical" if num_groups % num_nodes == 0 else "global"
    if policy == "hierarchical" and num_groups % num_nodes:
        raise RebalanceError(f"the hierarchical policy needs num_groups = {num_groups} to be divisible by "
                             f"num_nodes = {num_nodes}; use --policy global")
    return policy


def rebalance(weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_ranks: int,
              policy: str = "auto", previous: torch.Tensor | None = None, tolerance: float = 0.01) -> Rebalanced:
    """A placement of E logical experts on P physical slots over R ranks that balances `weight`.

    weight [L, E] (any real dtype, >= 0): load per logical expert, e.g. tokens routed to it.
    num_physical: P, a multiple of num_ranks, >= E. num_groups: G, dividing E (DeepSeek's expert groups).
    num_nodes: N, dividing num_ranks. num_ranks: R, the EP size.
    policy: "auto", "hierarchical" or "global" (see `resolve_policy`).
    previous [L, P] int64: the placement in use; when given, see `minimize_moves` (with `tolerance`).

    Every expert gets at least one slot and every rank exactly P/R; an expert's replicas sit on distinct ranks
    wherever the packing leaves the room. Returns `Rebalanced(phy2log, log2phy, logcnt)`.
    """
    weight = _check_weight(weight)
    num_layers, num_logical = weight.shape
    _check_shape(num_logical, num_physical, num_groups, num_nodes, num_ranks)
    policy = resolve_policy(policy, num_groups, num_nodes)
    if policy == "hierarchical":
        phy2log = _place(weight, num_physical, num_groups, num_nodes, num_ranks)
    else:
        phy2log = _place(weight, num_physical, 1, 1, num_ranks)
    trivial = ExpertPlacement.default(num_layers, num_logical, num_ranks, num_physical - num_logical).phy2log
    worse = balancedness(weight, phy2log, num_ranks) < balancedness(weight, trivial, num_ranks)
    phy2log = torch.where(worse.unsqueeze(1), trivial, phy2log)
    if previous is not None:
        phy2log = minimize_moves(weight, phy2log, previous, num_ranks,
                                 num_nodes if policy == "hierarchical" else 1, tolerance).phy2log
    placement = ExpertPlacement(phy2log, num_ranks, num_logical)
    return Rebalanced(placement.phy2log, placement.log2phy, placement.logcnt)


def minimize_moves(weight: torch.Tensor, phy2log: torch.Tensor, previous: torch.Tensor, num_ranks: int,
                   num_nodes: int = 1, tolerance: float = 0.01) -> MoveReport:
    """Of the placements that balance `weight` about as well as `phy2log`, one that moves few expert weights.

    weight [L, E]; phy2log, previous [L, P] int64. Per layer: when `previous` balances `weight` within a relative
    `tolerance` of `phy2log` (balancedness >= (1 - tolerance) x that of `phy2log`), it is kept as it is: nothing
    moves. Otherwise `phy2log` is permuted by `align_to_previous`, which leaves every rank's load as it was.
    `num_nodes` > 1 keeps each node's ranks together (the hierarchical policy's groups stay on their node).
    """
    weight = _check_weight(weight)
    num_layers, num_logical = weight.shape
    if previous.shape != phy2log.shape or phy2log.dim() != 2 or phy2log.shape[0] != num_layers:
        raise RebalanceError(f"previous placement has shape {tuple(previous.shape)}, the new one "
                             f"{tuple(phy2log.shape)}, the load {tuple(weight.shape)}: they must agree on layers "
                             f"and slots")
    if not math.isfinite(tolerance) or tolerance < 0:
        raise RebalanceError(f"tolerance must be a finite number >= 0, got {tolerance}")
    try:
        previous = ExpertPlacement(previous, num_ranks, num_logical).phy2log
    except PlacementError as e:
        raise RebalanceError(f"previous placement: {e}") from None
    aligned = align_to_previous(phy2log, previous, num_ranks, num_nodes)
    keep = balancedness(weight, previous, num_ranks) >= (1 - tolerance) * balancedness(weight, phy2log, num_ranks)
    chosen = torch.where(keep.unsqueeze(1), previous, aligned)
    return MoveReport(chosen, moved_slots(previous, phy2log), moved_slots(previous, chosen), keep)


def align_to_previous(phy2log: torch.Tensor, previous: torch.Tensor, num_ranks: int,
                      num_nodes: int = 1) -> torch.Tensor:
    """phy2log, previous [L, P] int64 -> phy2log [L, P] permuted so that most slots keep their previous expert.

    Only permutations that keep every rank's experts together are used: slots within a rank, whole ranks within
    a node, whole nodes. So every rank's load stays as it was (balancedness too), and the moves never exceed those
    of `phy2log` itself (the identity is one of these permutations, and the assignment is optimal).
    """
    if phy2log.dim() != 2 or previous.shape != phy2log.shape:
        raise RebalanceError(f"placements must both be [L, P], got {tuple(phy2log.shape)} and "
                             f"{tuple(previous.shape)}")
    num_layers, num_physical = phy2log.shape
    if num_physical % num_ranks or num_ranks % num_nodes:
        raise RebalanceError(f"need num_ranks = {num_ranks} to divide num_physical = {num_physical} and "
                             f"num_nodes = {num_nodes} to divide num_ranks")
    rows = [_align_layer(new, old, num_ranks, num_nodes)
            for new, old in zip(phy2log.tolist(), previous.tolist(), strict=True)]
    return torch.tensor(rows, dtype=torch.int64).view(num_layers, num_physical)


# ---- checks -------------------------------------------------------------------------------------------------------


def _check_weight(weight: torch.Tensor) -> torch.Tensor:
    """-> weight [L, E] float64 on the CPU, or RebalanceError."""
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


def _check_shape(num_logical: int, num_physical: int, num_groups: int, num_nodes: int, num_ranks: int) -> None:
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


# ---- the algorithm ------------------------------------------------------------------------------------------------


def _place(weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int,
           num_ranks: int) -> torch.Tensor:
    """weight [L, E] float64 -> phy2log [L, P] int64 by the hierarchical policy (global: G = N = 1)."""
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    experts_per_node, slots_per_node = num_logical // num_nodes, num_physical // num_nodes

    # Groups onto nodes. Then number the experts node-major ("positions"): node n holds positions
    # [n*E/N, (n+1)*E/N), its groups in packing order, each group's experts contiguous.
    group_load = weight.view(num_layers, num_groups, group_size).sum(-1)  # [L, G]
    node, nth = _pack(group_load, num_nodes)
    first = (node * (num_groups // num_nodes) + nth) * group_size  # [L, G] position of each group's first expert
    log2pos = (first.unsqueeze(-1) + torch.arange(group_size)).view(num_layers, num_logical)
    pos2log = torch.empty_like(log2pos).scatter_(1, log2pos, torch.arange(num_logical).expand_as(log2pos))

    # Replicas within each node: one row per (layer, node) from here on.
    node_weight = weight.gather(1, pos2log).view(num_layers * num_nodes, experts_per_node)
    rep2pos, count = _replicate(node_weight, slots_per_node)  # [L*N, P/N] local positions, [L*N, E/N]

    # Replicas onto the node's ranks; an expert's replicas carry equal shares of its load.
    rep_load = (node_weight / count).gather(1, rep2pos)
    rank, nth = _pack(rep_load, num_ranks // num_nodes, labels=rep2pos)
    local_slot = rank * (num_physical // num_ranks) + nth
    slot2pos = torch.empty_like(rep2pos).scatter_(1, local_slot, rep2pos)
    node_base = (torch.arange(num_nodes) * experts_per_node).view(1, num_nodes, 1)
    positions = (slot2pos.view(num_layers, num_nodes, slots_per_node) + node_base).view(num_layers, num_physical)
    return pos2log.gather(1, positions)


def _replicate(weight: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [X, n] float64 -> (rep2item [X, num_slots] int64, count [X, n] int64).

    Slots 0..n-1 hold items 0..n-1; each further slot goes to the item with the largest load per replica, which
    minimises the largest load per replica. Ties go to the item with fewer replicas, then the lower index.
    """
    rows, num_items = weight.shape
    rep2item = torch.arange(num_slots).repeat(rows, 1)
    count = torch.ones(rows, num_items, dtype=torch.int64)
    row = torch.arange(rows)
    for slot in range(num_items, num_slots):
        per_replica = weight / count
        tied = per_replica == per_replica.amax(1, keepdim=True)
        pick = torch.where(tied, count, num_slots + 1).argmin(1)  # argmin: the first index on ties
        rep2item[:, slot] = pick
        count[row, pick] += 1
    return rep2item, count


def _pack(weight: torch.Tensor, num_packs: int,
          labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [X, n] float64 -> (pack [X, n], nth [X, n]) int64: n/num_packs items in every pack, balanced.

    Heaviest item first, each onto the lightest pack with room (lowest index on ties); a pack already holding an
    item with the same label [X, n] is passed over while another has room. `nth` is the item's place in its
    pack, in packing order. With one item per pack the items keep their order (nothing to balance).
    """
    rows, num_items = weight.shape
    per_pack = num_items // num_packs
    if per_pack == 1:
        return torch.arange(num_items).repeat(rows, 1), torch.zeros(rows, num_items, dtype=torch.int64)
    order = torch.sort(weight, dim=1, descending=True, stable=True).indices.tolist()
    weights = weight.tolist()
    label_rows = labels.tolist() if labels is not None else [[-1 - i for i in range(num_items)]] * rows
    pack = [[0] * num_items for _ in range(rows)]
    nth = [[0] * num_items for _ in range(rows)]
    for x in range(rows):
        loads, fill = [0.0] * num_packs, [0] * num_packs
        held: list[set[int]] = [set() for _ in range(num_packs)]
        w, lab = weights[x], label_rows[x]
        for item in order[x]:
            best, best_key = -1, (True, math.inf)
            for k in range(num_packs):
                if fill[k] < per_pack:
                    key = (lab[item] in held[k], loads[k])
                    if key < best_key:
                        best, best_key = k, key
            pack[x][item], nth[x][item] = best, fill[best]
            fill[best] += 1
            loads[best] += w[item]
            held[best].add(lab[item])
    return torch.tensor(pack, dtype=torch.int64), torch.tensor(nth, dtype=torch.int64)


# ---- keeping slots where they are ---------------------------------------------------------------------------------


def _align_layer(new: list[int], old: list[int], num_ranks: int, num_nodes: int) -> list[int]:
    """One layer of `align_to_previous`: new, old [P] experts per slot -> new permuted."""
    if new == old:
        return new
    per_rank = len(new) // num_ranks
    new_ranks = [new[r * per_rank:(r + 1) * per_rank] for r in range(num_ranks)]
    old_ranks = [old[r * per_rank:(r + 1) * per_rank] for r in range(num_ranks)]
    num_experts = max(max(new), max(old)) + 1
    new_counts = np.zeros((num_ranks, num_experts), dtype=np.int64)
    old_counts = np.zeros((num_ranks, num_experts), dtype=np.int64)
    rank_of_slot = np.arange(len(new)) // per_rank
    np.add.at(new_counts, (rank_of_slot, np.asarray(new)), 1)
    np.add.at(old_counts, (rank_of_slot, np.asarray(old)), 1)
    # kept[a, b]: slots that keep their expert when new rank a's experts take old rank b's place,
    # sum_e min(new[a, e], old[b, e]) = sum_k sum_e [new[a, e] >= k][old[b, e] >= k], as matrix products
    kept = sum((new_counts >= k).astype(np.float64) @ (old_counts >= k).astype(np.float64).T
               for k in range(1, int(min(new_counts.max(), old_counts.max())) + 1))
    kept = np.rint(kept).astype(np.int64)
    ranks_per_node = num_ranks // num_nodes
    if num_nodes == 1:
        source = _assign_ranks(kept, per_rank)
    else:
        # The best rank assignment for every (new node, old node) pair, then the best node assignment.
        blocks, node_kept = {}, np.zeros((num_nodes, num_nodes), dtype=np.int64)
        for a in range(num_nodes):
            for b in range(num_nodes):
                sub = kept[a * ranks_per_node:(a + 1) * ranks_per_node, b * ranks_per_node:(b + 1) * ranks_per_node]
                blocks[a, b] = _assign_ranks(sub, per_rank)
                node_kept[a, b] = sub[blocks[a, b], np.arange(ranks_per_node)].sum()
        node_source = _assign_max(node_kept)
        source = np.concatenate([blocks[int(node_source[b]), b] + int(node_source[b]) * ranks_per_node
                                 for b in range(num_nodes)])
    out: list[int] = []
    for b in range(num_ranks):
        out += _align_rank(new_ranks[int(source[b])], old_ranks[b])
    return out


def _align_rank(new: list[int], old: list[int]) -> list[int]:
    """The experts `new` of one rank, ordered so that as many slots as possible keep the expert in `old`."""
    left = Counter(new)
    out: list[int | None] = []
    for e in old:
        if left[e]:
            left[e] -= 1
            out.append(e)
        else:
            out.append(None)
    rest = []
    for e in new:  # what was not kept, in the balancer's order
        if left[e]:
            left[e] -= 1
            rest.append(e)
    fill = iter(rest)
    return [e if e is not None else next(fill) for e in out]


def _assign_ranks(kept: np.ndarray, per_rank: int) -> np.ndarray:
    """kept [n, n] slots kept by new rank a in old rank b's place -> source [n]: the assignment keeping most.

    A new rank with the same experts as an old one can take its place in some best assignment (|A&B| >=
    |A&C| + |C&B| - |C| for multisets of one size), so such pairs are matched first: an unchanged placement
    costs no search at all.
    """
    n = kept.shape[0]
    source = np.full(n, -1, dtype=np.int64)
    taken = np.zeros(n, dtype=bool)
    for a, b in zip(*np.nonzero(kept == per_rank), strict=True):
        if source[b] < 0 and not taken[a]:
            source[b], taken[a] = a, True
    rows, cols = np.flatnonzero(~taken), np.flatnonzero(source < 0)
    if rows.size:
        source[cols] = rows[_assign_max(kept[np.ix_(rows, cols)])]
    return source


def _assign_max(score: np.ndarray) -> np.ndarray:
    """score [n, n] -> source [n] int64: the permutation maximising sum_j score[source[j], j].

    The Hungarian algorithm with potentials (O(n^3), inner loops vectorised); column 0 of its 1-based tables is
    the virtual start of each augmenting path.
    """
    n = score.shape[0]
    cost = -np.asarray(score, dtype=np.float64)
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    row_of = np.zeros(n + 1, dtype=np.int64)  # 1-based row matched to each column, 0 while free
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        row_of[0], col = i, 0
        min_reduced = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[col] = True
            reduced = cost[row_of[col] - 1] - u[row_of[col]] - v[1:]
            free = ~used[1:]
            better = free & (reduced < min_reduced[1:])
            min_reduced[1:][better] = reduced[better]
            way[1:][better] = col
            candidates = np.where(free, min_reduced[1:], np.inf)
            nxt = int(candidates.argmin()) + 1
            delta = candidates[nxt - 1]
            u[row_of[used]] += delta
            v[used] -= delta
            min_reduced[1:][free] -= delta
            col = nxt
            if row_of[col] == 0:
                break
        while col:  # flip the augmenting path
            prev = way[col]
            row_of[col] = row_of[prev]
            col = prev
    return row_of[1:] - 1
