"""The rounds of a placement switch: each within the staging bound where the chains allow (parking a displaced sole
replica where one slot's expert has a replica to spare), every intermediate row still a placement, every source
holding its expert when the round is staged, and the last row the new one."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from moemesh.ep.move_plan import plan_layer


def _random_row(rng: random.Random, experts: int, slots: int) -> list[int]:
    row = list(range(experts)) + [rng.randrange(experts) for _ in range(slots - experts)]
    rng.shuffle(row)
    return row


def _check(old: list[int], new: list[int], ranks: int, bound: int) -> list:
    rounds = plan_layer(3, old, new, ranks, bound)
    per_rank = len(old) // ranks
    cur = list(old)
    for i, rnd in enumerate(rounds):
        assert rnd.layer == 3 and rnd.last_of_layer == (i == len(rounds) - 1)
        before = list(cur)  # sources are read before the round switches in
        displaced = {before[m.slot] for m in rnd.moves}
        for m in rnd.moves:
            assert before[m.source] == m.expert != before[m.slot]
            # Its slot's new expert, or a sole replica that another move of the round displaces, parked.
            assert m.expert == new[m.slot] or (m.expert in displaced and before.count(m.expert) == 1)
            rank_slots = range(m.slot // per_rank * per_rank, (m.slot // per_rank + 1) * per_rank)
            if any(before[q] == m.expert for q in rank_slots):
                assert m.source // per_rank == m.slot // per_rank  # a local copy when the rank has it
            cur[m.slot] = m.expert
        assert tuple(cur) == rnd.row
        assert set(cur) == set(range(len(set(old))))  # every expert keeps a replica between rounds
        staged = Counter(m.slot // per_rank for m in rnd.moves)
        assert rnd.over_bound or max(staged.values(), default=0) <= bound
        if rnd.over_bound:  # only where no slot could take a parked expert within the bound
            spare = [q for q, e in enumerate(before) if before.count(e) > 1]
            assert not spare or (bound == 1 and ranks == 1)
    assert cur == new
    return rounds


@pytest.mark.parametrize("seed", range(40))
def test_random_switches_keep_every_expert_and_the_bound(seed: int) -> None:
    rng = random.Random(seed)
    ranks = rng.choice([2, 3, 4, 8])
    experts = rng.choice([8, 16, 32])
    slots = ranks * (-(-experts // ranks) + rng.choice([0, 1, 2]))
    old, new = _random_row(rng, experts, slots), _random_row(rng, experts, slots)
    for bound in (1, 2, slots):
        rounds = _check(old, new, ranks, bound)
        if bound == slots:
            assert len(rounds) == 1


def test_nothing_to_move_is_one_empty_round() -> None:
    row = [0, 1, 2, 3, 0, 1]
    (rnd,) = plan_layer(0, row, list(row), 2, 1)
    assert rnd.moves == () and rnd.row == tuple(row) and rnd.last_of_layer


def test_a_small_bound_takes_several_rounds() -> None:
    old = [0, 1, 2, 3, 4, 5, 6, 7]
    new = [4, 5, 6, 7, 0, 1, 2, 3]  # every expert crosses ranks: chains pair a slot of each rank
    rounds = _check(old, new, 2, 1)
    assert len(rounds) == 4 and not any(r.over_bound for r in rounds)


def test_an_unsplittable_chain_with_no_spare_replica_is_staged_whole_and_said() -> None:
    old, new = [0, 1, 2, 3], [1, 0, 2, 3]  # two sole replicas swap places on one rank, no expert to spare
    rounds = _check(old, new, 2, 1)
    assert len(rounds) == 1 and rounds[0].over_bound


def test_a_chain_of_sole_replicas_on_one_rank_is_parked_and_keeps_the_bound() -> None:
    # Experts 0, 1, 2 (one replica each) rotate among rank 0's slots; rank 1 holds expert 3 twice. With one slot a
    # rank per round the chain cannot go whole: one expert waits in one of expert 3's slots meanwhile.
    old, new = [0, 1, 2, 3, 3, 4], [1, 2, 0, 3, 3, 4]
    rounds = _check(old, new, 2, 1)
    assert not any(r.over_bound for r in rounds)
    parked = [m for r in rounds for m in r.moves if m.expert != new[m.slot]]
    assert len(parked) == 1 and parked[0].slot in (3, 4)
    assert sum(len(r.moves) for r in rounds) == 5  # the three changes, the parking and the slot's way back


@pytest.mark.parametrize("seed", range(40))
def test_v3_sized_switches_at_a_bound_of_one_slot_never_exceed_it(seed: int) -> None:
    rng = random.Random(1000 + seed)
    ranks, experts = rng.choice([(8, 64), (16, 64), (32, 256)])
    slots = experts + ranks * rng.choice([1, 2])
    old, new = _random_row(rng, experts, slots), _random_row(rng, experts, slots)
    rounds = _check(old, new, ranks, 1)
    assert not any(r.over_bound for r in rounds)
