"""Keeping expert weights where they are: given the placement in use, a new placement permuted so that as many
slots as possible keep their expert, or the old one kept where it balances within a tolerance as well.

moemesh's addition to DeepSeek's EPLB (`moemesh.services.eplb.rebalance`), which places from scratch every time.

Legend: L MoE layers, E logical experts, N nodes, R EP ranks, P physical slots (rank r holds slots
[r*P/R, (r+1)*P/R), node n holds ranks [n*R/N, (n+1)*R/N), as in `moemesh.ep.placement`).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import NamedTuple

import numpy as np
import torch

from moemesh.ep.placement import ExpertPlacement, PlacementError
from moemesh.services.eplb.balance import balancedness, moved_slots
from moemesh.services.eplb.guards import RebalanceError, check_weight


class MoveReport(NamedTuple):
    """phy2log [L, P] int64 the placement to use; moved_before / moved_after [L] int64 slots that change expert
    going from the previous placement to the balancer's own answer / to `phy2log`; kept_previous [L] bool the
    layers where the previous placement balanced about as well and was kept as it was."""

    phy2log: torch.Tensor
    moved_before: torch.Tensor
    moved_after: torch.Tensor
    kept_previous: torch.Tensor


def minimize_moves(weight: torch.Tensor, phy2log: torch.Tensor, previous: torch.Tensor, num_ranks: int,
                   num_nodes: int = 1, tolerance: float = 0.01) -> MoveReport:
    """Of the placements that balance `weight` about as well as `phy2log`, one that moves few expert weights.

    weight [L, E]; phy2log, previous [L, P] int64. Per layer: when `previous` balances `weight` within a relative
    `tolerance` of `phy2log` (balancedness >= (1 - tolerance) x that of `phy2log`), it is kept as it is: nothing
    moves. Otherwise `phy2log` is permuted by `align_to_previous`, which leaves every rank's load as it was.
    `num_nodes` > 1 keeps each node's ranks together (the hierarchical policy's groups stay on their node).
    """
    weight = check_weight(weight)
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


# ---- one layer ----------------------------------------------------------------------------------------------------


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
