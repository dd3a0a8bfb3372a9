"""Local search over a packing of expert replicas onto ranks: lower the heaviest rank's load while it helps.

moemesh's addition to DeepSeek's EPLB (`moemesh.services.eplb.rebalance`), whose three greedy stages (groups onto
nodes, replica counts, replicas onto ranks) are each blind to the next. Starting from any packing, two moves are
tried on the heaviest rank of every row, all rows at once (one step of the loop serves every row still improving):

- swap: one replica of the heaviest rank h trades places with one replica of another rank r. Slot counts stay
  as they are; the best swap is the one with the lowest max(load h, load r) afterwards.
- re-split: when no swap helps, one expert y of h gets a further replica, in the slot of a replica of an expert x
  with two or more (on a rank without y): y's replicas all lighten, x's others all get heavier.

A move is taken only when the row's largest rank load drops strictly below what it was (the ranks the move does not
touch keep theirs), so balancedness never falls and the loop ends; `max_steps` bounds it. No move puts a second copy
of an expert on a rank that holds one already, and none leaves an expert on fewer ranks than min(its replicas,
K) unless it was so before: replicas stay on distinct ranks wherever they were.

Legend: B rows (one per layer, or per (layer, node) in the hierarchical policy), E experts, K ranks in a row,
S slots per rank, M = K*S slots in a row (rank k holds the row's slots [k*S, (k+1)*S)). The dispatcher splits an
expert's tokens evenly over its replicas, so each replica carries weight / replicas (`moemesh.services.eplb.balance`).
"""

from __future__ import annotations

import math

import torch

# A move must lower the heaviest rank by more than rounding could: loads are float64 sums of a few terms.
_STRICT = 1 - 1e-12


def improve_packing(weight: torch.Tensor, items: torch.Tensor, num_ranks: int, max_steps: int = 512) -> torch.Tensor:
    """A packing of each row that balances at least as well as `items`, found by swaps and re-splits.

    weight [B, E] float64 (>= 0): load of each expert in each row (experts a row does not hold are ignored).
    items [B, M] int64: the expert in each slot of the row; every expert of the row appears at least once.
    num_ranks: K, dividing M. max_steps: moves per row at most (each step moves once in every row still improving).
    Returns items [B, M] int64: the same slots per rank, every expert still at least once, no new expert twice on
    a rank, and in every row a largest rank load no larger than before.
    """
    num_rows, num_slots = items.shape
    if num_slots % num_ranks:
        raise ValueError(f"{num_slots} slots per row do not divide over {num_ranks} ranks")
    if num_ranks == 1:
        return items.clone()  # one rank holds everything: nothing to balance
    state = _Packing(weight.double(), items, num_ranks)
    active = torch.ones(num_rows, dtype=torch.bool)
    for _ in range(max_steps):
        rows = active.nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        loads = state.per_replica[rows].sum(-1)  # [b, K]
        top, heavy = loads.max(1)
        swapped = state.swap(rows, loads, top, heavy)
        stuck = ~swapped
        if stuck.any():
            split = state.resplit(rows[stuck], loads[stuck], top[stuck], heavy[stuck])
            active[rows[stuck][~split]] = False
    return state.items.view(num_rows, num_slots)


class _Packing:
    """The packing being improved, and the tables kept next to it so that a move costs no full recount.

    items [B, K, S] int64 expert per slot; counts [B, E] int64 replicas per expert; on_rank [B, K, E] int16 copies
    of each expert per rank; per_replica [B, K, S] float64 the load each slot carries.
    """

    def __init__(self, weight: torch.Tensor, items: torch.Tensor, num_ranks: int) -> None:
        num_rows, num_slots = items.shape
        self.weight = weight
        self.num_ranks, self.per_rank = num_ranks, num_slots // num_ranks
        self.items = items.long().reshape(num_rows, num_ranks, self.per_rank).clone()
        self.counts = torch.zeros_like(weight, dtype=torch.int64).scatter_add_(1, items.long(),
                                                                                torch.ones_like(items.long()))
        self.on_rank = torch.zeros(num_rows, num_ranks, weight.shape[1], dtype=torch.int16)
        self.on_rank.scatter_add_(2, self.items, torch.ones_like(self.items, dtype=torch.int16))
        self.per_replica = self._per_replica(torch.arange(num_rows))

    def _per_replica(self, rows: torch.Tensor) -> torch.Tensor:
        """[b, K, S] float64: each slot's share of its expert's load in `rows`."""
        share = self.weight[rows] / self.counts[rows].clamp(min=1)
        return share.gather(1, self.items[rows].flatten(1)).view(-1, self.num_ranks, self.per_rank)

    def swap(self, rows: torch.Tensor, loads: torch.Tensor, top: torch.Tensor, heavy: torch.Tensor) -> torch.Tensor:
        """The best swap of the heaviest rank in each row, made where it lowers the row's top load -> [b] bool.

        rows [b] int64; loads [b, K] float64; top, heavy [b]: the largest load and its rank.
        """
        b, k, s = rows.numel(), self.num_ranks, self.per_rank
        at = torch.arange(b)
        vals, experts = self.per_replica[rows], self.items[rows]  # [b, K, S]
        heavy_vals, heavy_experts = vals[at, heavy], experts[at, heavy]  # [b, S]
        # delta[i, r, j]: what h gains (and r loses) when h's slot i and r's slot j trade experts
        delta = vals[:, None] - heavy_vals[:, :, None, None]  # [b, S, K, S]
        worst = torch.maximum(top[:, None, None, None] + delta, loads[:, None, :, None] - delta)
        # A swap must not bring an expert to a rank that already holds it. When the two slots hold the same expert
        # the swap changes nothing, and the strict test below turns it down anyway.
        on_heavy = self.on_rank[rows, heavy].gather(1, experts.flatten(1)).view(b, k, s) > 0  # [b, K, S(j)]
        heavy_on_r = self.on_rank[rows[:, None, None], torch.arange(k)[None, :, None], heavy_experts[:, None, :]] > 0
        blocked = on_heavy[:, None] | heavy_on_r.transpose(1, 2)[:, :, :, None]  # [b, S(i), K, S(j)]
        best, pick = worst.masked_fill_(blocked, math.inf).flatten(1).min(1)
        ok = best < top * _STRICT
        if ok.any():
            row, h, pick = rows[ok], heavy[ok], pick[ok]
            i, r, j = pick // (k * s), (pick // s) % k, pick % s
            a, z = self.items[row, h, i], self.items[row, r, j]
            va, vz = self.per_replica[row, h, i], self.per_replica[row, r, j]
            self.items[row, h, i], self.items[row, r, j] = z, a
            self.per_replica[row, h, i], self.per_replica[row, r, j] = vz, va
            for rank, gone, came in ((h, a, z), (r, z, a)):
                self.on_rank[row, rank, gone] -= 1
                self.on_rank[row, rank, came] += 1
        return ok

    def resplit(self, rows: torch.Tensor, loads: torch.Tensor, top: torch.Tensor, heavy: torch.Tensor) -> torch.Tensor:
        """One more replica for an expert of the heaviest rank, taken from another expert, where the row's top load
        drops -> [b] bool. rows [b] int64; loads [b, K] float64; top, heavy [b] as in `swap`."""
        b, k, s = rows.numel(), self.num_ranks, self.per_rank
        at = torch.arange(b)
        weight, counts = self.weight[rows], self.counts[rows].double()  # [b, E]
        on_rank = self.on_rank[rows].double()  # [b, K, E]
        experts = self.items[rows].flatten(1)  # [b, M]
        # y: the expert of h whose replicas would lighten most with one more
        heavy_experts = self.items[rows, heavy]  # [b, S]
        shed = weight / counts.clamp(min=1) - weight / (counts + 1)  # [b, E] what each replica sheds
        y = heavy_experts.gather(1, shed.gather(1, heavy_experts).argmax(1, keepdim=True)).squeeze(1)  # [b]
        y_new = weight[at, y] / (counts[at, y] + 1)
        # x, any expert with two or more replicas: each of its other replicas gains `gain[x]`
        donor = counts >= 2
        gain = torch.where(donor, weight / (counts - 1).clamp(min=1) - weight / counts.clamp(min=1), 0.0)  # [b, E]
        y_on = on_rank[at, :, y]  # [b, K]
        # after[x, q]: rank q's load when x gives up a replica (the slot not yet counted) and y gets one
        after = loads[:, None, :] + gain[:, :, None] * on_rank.transpose(1, 2) - (shed[at, y, None] * y_on)[:, None]
        # The slot taken is replica x on rank r: r loses it at its new weight and holds y instead; every other
        # rank q ends at after[x, q], whose largest over q != r comes from the two largest over all q.
        ranks = torch.arange(k).repeat_interleave(s).expand(b, -1)  # [b, M] rank of each slot
        pick2 = experts[:, :, None].expand(-1, -1, 2)
        top2 = after.topk(2, dim=2)
        top2_v, top2_q = top2.values.gather(1, pick2), top2.indices.gather(1, pick2)  # [b, M, 2]
        others = torch.where(top2_q[..., 0] == ranks, top2_v[..., 1], top2_v[..., 0])
        at_r = (after[at[:, None], experts, ranks]
                - weight.gather(1, experts) / (counts.gather(1, experts) - 1).clamp(min=1) + y_new[:, None])
        worst = torch.maximum(others, at_r)
        # x gives up a replica only where its replicas stay as spread as before: from a rank holding two of it, or
        # when it has no more replicas than there are ranks (then every one of them keeps a rank of its own).
        spread = (on_rank[at[:, None], ranks, experts] >= 2) | (counts.gather(1, experts) <= k)
        blocked = ~(donor.gather(1, experts) & spread) | (experts == y[:, None]) | (y_on.gather(1, ranks) > 0)
        best, pick = worst.masked_fill_(blocked, math.inf).min(1)
        ok = best < top * _STRICT
        if ok.any():
            row, pick, y = rows[ok], pick[ok], y[ok]
            r, j = pick // s, pick % s
            x = self.items[row, r, j].clone()
            self.items[row, r, j] = y
            self.on_rank[row, r, x] -= 1
            self.on_rank[row, r, y] += 1
            self.counts[row, x] -= 1
            self.counts[row, y] += 1
            self.per_replica[row] = self._per_replica(row)
        return ok
