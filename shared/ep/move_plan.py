"""Which expert weights a placement switch moves, in rounds that fit a staging bound; pure Python, no tensors moved.

A switch changes some slots of a MoE layer from one logical expert to another. Each changed slot needs its new
expert's weights staged on its rank before the layer can switch, and staging memory is bounded, so a layer's
changes go in rounds: each round is staged, then switched at one step boundary. After every round the layer's
row must still be a placement (every expert keeps a replica), because serving goes on between rounds; a round
therefore takes whole chains of changes whose removed experts the round itself puts back elsewhere.

Every rank computes the same plan from the same rows, so the ranks agree on rounds, sources and byte counts
without talking.

Legend: P physical slots of a layer, R ranks; rank r holds slots [r * P/R, (r+1) * P/R).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Move:
    """Slot `slot` takes expert `expert`, copied from slot `source`, which holds it before the round. The expert is
    the slot's expert in the new row, or, where a chain of changes is parked (`plan_layer`), the expert that a
    later round moves to its own slot."""

    slot: int
    expert: int
    source: int


@dataclass(frozen=True)
class Round:
    """One staged-then-switched step of a layer's switch.

    moves: in slot order (empty: the layer keeps its row, nothing to stage).
    row: the layer's phy2log row [P] once the round has switched.
    last_of_layer: the layer is done after this round.
    over_bound: the round stages more slots on some rank than the bound allows (a chain of changes that cannot
        be split without losing an expert's last replica, and no slot to park one in); said in the log.
    """

    layer: int
    moves: tuple[Move, ...]
    row: tuple[int, ...]
    last_of_layer: bool
    over_bound: bool = False


def plan_layer(layer: int, old_row: list[int], new_row: list[int], ep_size: int, max_slots_per_rank: int
               ) -> list[Round]:
    """The rounds that take MoE layer `layer` from `old_row` to `new_row` (phy2log rows [P]), each staging at most
    `max_slots_per_rank` slots on any rank where the chains of changes allow. At least one round (an empty one
    when nothing changes), so that every layer switches at a step boundary of its own.

    Where no whole chain fits the bound (sole replicas that take each other's slots, several of them on one rank),
    one change of it goes ahead and the expert it displaces is parked in a slot whose expert has a replica to
    spare (`_park`): an extra copy, and the chain comes apart into pieces that fit. Only with no such slot is a
    chain staged whole, over the bound."""
    if len(old_row) != len(new_row) or len(old_row) % ep_size:
        raise ValueError(f"rows of {len(old_row)} and {len(new_row)} slots do not fit {ep_size} ranks")
    if max_slots_per_rank < 1:
        raise ValueError(f"a round must stage at least one slot per rank, got {max_slots_per_rank}")
    if set(new_row) != set(old_row):
        raise ValueError(f"MoE layer {layer}: the new row holds other experts than the old one")
    per_rank = len(old_row) // ep_size
    cur = list(old_row)
    remaining = [p for p in range(len(cur)) if cur[p] != new_row[p]]
    rounds: list[Round] = []
    parks = 0
    while remaining:
        chosen: set[int] = set()
        staged = [0] * ep_size
        for p in remaining:
            if p in chosen:
                continue
            chain = _closure(p, chosen, cur, new_row, remaining, per_rank, staged)
            extra = Counter(q // per_rank for q in chain)
            if all(staged[r] + n <= max_slots_per_rank for r, n in extra.items()):
                chosen |= chain
                for r, n in extra.items():
                    staged[r] += n
        targets = {p: new_row[p] for p in chosen}
        over = False
        if not chosen:
            # Parking leaves as many slots to change as before; bounded, so that the plan always ends.
            parked = _park(cur, new_row, remaining, per_rank, max_slots_per_rank) if parks < len(cur) else None
            if parked is not None:
                parks += 1
                targets = parked
            else:  # take the shortest chain whole rather than lose an expert
                over = True
                chain = min((_closure(p, set(), cur, new_row, remaining, per_rank, [0] * ep_size) for p in remaining),
                            key=lambda c: (max(Counter(q // per_rank for q in c).values()), len(c)))
                targets = {p: new_row[p] for p in chain}
                log.warning("MoE layer %d: a chain of %d changed slots cannot be split below the staging bound of %d "
                            "slot(s) per rank; staging it whole", layer, len(chain), max_slots_per_rank)
        moves = _sources(targets, cur, per_rank)
        for p, e in targets.items():
            cur[p] = e
        remaining = [p for p in range(len(cur)) if cur[p] != new_row[p]]
        rounds.append(Round(layer, moves, tuple(cur), last_of_layer=not remaining, over_bound=over))
    return rounds or [Round(layer, (), tuple(cur), last_of_layer=True)]


def _closure(p: int, chosen: set[int], cur: list[int], new: list[int], remaining: list[int], per_rank: int,
             staged: list[int]) -> set[int]:
    """The changed slots to add to `chosen` with `p` so that, applied to `cur`, every expert keeps a replica.

    An expert left without one gets a slot that changes to it, on the rank with the fewest slots staged so far
    (chains then spread over the ranks, and fit a small bound more often); that slot's own expert may then need
    one, and so on. The chain ends: applying every remaining change gives `new`, which holds every expert.
    """
    members = chosen | {p}
    load = Counter(q // per_rank for q in members)
    for r, n in enumerate(staged):
        load[r] = max(load[r], n)
    while True:
        counts = Counter(new[q] if q in members else e for q, e in enumerate(cur))
        lost = sorted(e for e in set(cur) if counts[e] == 0)
        if not lost:
            return members - chosen
        for e in lost:
            q = min((q for q in remaining if q not in members and new[q] == e), key=lambda q: (load[q // per_rank], q))
            members.add(q)
            load[q // per_rank] += 1


def _park(cur: list[int], new: list[int], remaining: list[int], per_rank: int, bound: int) -> dict[int, int] | None:
    """One changed slot `p` takes its new expert, and the sole replica it displaces goes to a slot `s` whose expert
    keeps another replica: {p: new[p], s: cur[p]}, within `bound` slots per rank; None when no such pair exists.

    Prefers an `s` that changes anyway (nothing that was in place moves away), then one on another rank than `p`,
    then the lowest slots. The displaced expert reaches its own slots in later rounds, as pieces that fit."""
    counts = Counter(cur)
    best: tuple[tuple[int, int, int, int], dict[int, int]] | None = None
    for p in remaining:
        if counts[cur[p]] > 1:
            continue  # p displaces nothing that needs a home: its chain would have fit
        for s, e in enumerate(cur):
            same_rank = s // per_rank == p // per_rank
            if s == p or counts[e] < 2 or (same_rank and bound < 2):
                continue
            key = (cur[s] == new[s], same_rank, p, s)
            if best is None or key < best[0]:
                best = (key, {p: new[p], s: cur[p]})
    return None if best is None else best[1]


def _sources(targets: dict[int, int], cur: list[int], per_rank: int) -> tuple[Move, ...]:
    """Where each changed slot (slot -> its expert after the round) copies its expert from: a slot of its own rank
    that holds it (no transfer), else the holder whose rank has sent least in this round (ties: lowest slot), to
    spread the senders. In slot order."""
    holders: dict[int, list[int]] = {}
    for q, e in enumerate(cur):
        holders.setdefault(e, []).append(q)
    sent: Counter[int] = Counter()
    moves = []
    for p in sorted(targets):
        rank, have = p // per_rank, holders[targets[p]]
        local = [q for q in have if q // per_rank == rank]
        src = local[0] if local else min(have, key=lambda q: (sent[q // per_rank], q))
        if not local:
            sent[src // per_rank] += 1
        moves.append(Move(p, targets[p], src))
    return tuple(moves)
