"""The balancer's per-group state (`moemesh.services.eplb.state`): sliding windows, placement versions, and when it
moves experts (period, least load, least gain).

Shapes: 2 MoE layers x 8 logical experts on an EP-2 group, with P = 8 slots (no redundancy) or P = 10 (two
redundant slots; the start-up placement puts experts 0 and 1 there, so rank 0 holds experts 0-4 and rank 1
experts 5, 6, 7, 0, 1).
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from moemesh.ep.placement import ExpertPlacement
from moemesh.services.eplb.state import Balancer, Policy, Shape

L, E, R = 2, 8, 2
KEY = ("decode-0", 2)  # (instance, WORKER_ROLE_DECODE)
HOT = (2, 3)  # both on rank 0 under the start-up placement, neither replicated


def shape(num_physical: int = 10) -> Shape:
    return Shape(num_layers=L, num_logical=E, num_physical=num_physical, ep_size=R, num_groups=1, num_nodes=1)


def default(num_physical: int = 10) -> torch.Tensor:
    return ExpertPlacement.default(L, E, R, num_physical - E).phy2log


def counts(hot: tuple[int, ...] = HOT, heavy: int = 400, light: int = 25) -> torch.Tensor:
    """One rank's window [L, E]: `heavy` tokens for each hot expert, `light` for the others."""
    c = torch.full((L, E), light, dtype=torch.int64)
    c[:, list(hot)] = heavy
    return c


def mean_balancedness(load: torch.Tensor, phy2log: torch.Tensor, num_ranks: int = R) -> float:
    """Mean over layers of mean/max per-rank load, an expert's load split evenly over its slots (by hand, not
    through `moemesh.services.eplb.balance`)."""
    values = []
    for layer_load, slots in zip(load.tolist(), phy2log.tolist(), strict=True):
        replicas = [slots.count(e) for e in range(len(layer_load))]
        per_rank = len(slots) // num_ranks
        ranks = [sum(layer_load[e] / replicas[e] for e in slots[r * per_rank:(r + 1) * per_rank])
                 for r in range(num_ranks)]
        values.append(sum(ranks) / len(ranks) / max(ranks) if max(ranks) > 0 else 1.0)
    return sum(values) / len(values)


def singles_on_rank0(phy2log: torch.Tensor) -> tuple[int, int]:
    """Two experts with a single slot, on rank 0, in every layer: a load on them is one that `phy2log` balances
    badly."""
    rows = phy2log.tolist()
    per_rank = len(rows[0]) // R
    found = [e for e in range(E) if all(row.count(e) == 1 and row.index(e) < per_rank for row in rows)]
    assert len(found) >= 2, phy2log
    return found[0], found[1]


def balancer(**policy: float | int | str) -> Balancer:
    return Balancer(Policy(**{"window_s": 60.0, "period_s": 30.0, "min_gain": 0.05, "min_tokens": 100, **policy}))


def report_both(b: Balancer, c: torch.Tensor, *, version: int = 0, phy2log: torch.Tensor | None = None,
                t_end: float = 1000.0, num_physical: int = 10) -> None:
    """Both ranks report `c`; rank 0 sends the placement along (as a stream's first report does)."""
    b.report(KEY, shape(num_physical), version, phy2log, t_end, c)
    b.report(KEY, shape(num_physical), version, None, t_end, c)


def later(b: Balancer) -> float:
    """A monotonic time at which the period has passed for every group."""
    return time.monotonic() + b.policy.period_s


@pytest.mark.parametrize("num_physical", [8, 10])
def test_skewed_load_gets_a_better_placement(num_physical: int) -> None:
    b = balancer()
    start = default(num_physical)
    report_both(b, counts(), phy2log=start, num_physical=num_physical)
    group = b.groups[KEY]
    load = 2 * counts()
    assert torch.equal(group.load(), load)
    before = mean_balancedness(load, start)
    # P=10: rank 0 carries 25 + 25 + 800 + 800 + 50 = 1700 tokens per layer, rank 1 150 + 25 + 25 = 200.
    # P=8: rank 0 holds experts 0-3, 1700 tokens, rank 1 experts 4-7, 200.
    assert before == pytest.approx(950 / 1700)
    assert group.balancedness().tolist() == pytest.approx([before] * L)

    p = b.decide(KEY, now=later(b))

    assert p is not None and p.version == 1
    placement = ExpertPlacement(p.phy2log, R, E)  # a valid placement: every expert somewhere, P/R slots per rank
    assert placement.num_physical == num_physical and placement.num_layers == L
    assert p.previous_balancedness == pytest.approx(before)
    assert p.expected_balancedness == pytest.approx(mean_balancedness(load, p.phy2log))
    assert p.expected_balancedness >= p.previous_balancedness + b.policy.min_gain
    assert p.num_moved_slots == int((p.phy2log != start).sum()) > 0
    for row in p.phy2log.tolist():  # the hot experts no longer all sit on rank 0
        assert {slot // placement.slots_per_rank for slot, e in enumerate(row) if e in HOT} == {0, 1}
    if num_physical == 10:  # the redundant slots go to the hot experts
        assert placement.logcnt[:, list(HOT)].tolist() == [[2, 2]] * L
    # Published: the group runs it, and its window starts afresh.
    assert group.placement is p and len(group.windows) == 0 and int(group.load().sum()) == 0


def test_uniform_load_is_kept() -> None:
    b = balancer()
    report_both(b, counts(heavy=25), phy2log=default())
    # 50 tokens per expert; experts 0 and 1 have a slot on each rank: 3 * 50 + 2 * 25 on each, already even.
    assert b.groups[KEY].balancedness().tolist() == pytest.approx([1.0] * L)
    assert b.decide(KEY, now=later(b)) is None
    group = b.groups[KEY]
    assert group.placement.version == 0 and torch.equal(group.placement.phy2log, default())
    assert len(group.windows) == 2  # nothing published, nothing forgotten


@pytest.mark.parametrize(("min_gain", "moves"), [(0.5, False), (0.4, True)])
def test_min_gain_is_the_threshold(min_gain: float, moves: bool) -> None:
    # The skewed load goes from 950/1700 = 0.559 to 1.0: a gain of 0.441.
    b = balancer(min_gain=min_gain)
    report_both(b, counts(), phy2log=default())
    p = b.decide(KEY, now=later(b))
    assert (p is not None) == moves
    assert b.groups[KEY].placement.version == (1 if moves else 0)


def test_too_little_load_decides_nothing_until_there_is_enough() -> None:
    b = balancer(min_tokens=2 * int(counts().sum()) + 1)  # one token more than both ranks' windows hold
    report_both(b, counts(), phy2log=default())
    now = later(b)
    assert b.decide(KEY, now=now) is None
    assert len(b.groups[KEY].windows) == 2 and b.groups[KEY].placement.version == 0
    one = torch.zeros(L, E, dtype=torch.int64)
    one[0, 0] = 1
    b.report(KEY, shape(), 0, None, 1001.0, one)
    # A decision not taken for lack of load does not use up the period.
    p = b.decide(KEY, now=now)
    assert p is not None and p.version == 1


def test_at_most_one_decision_per_period() -> None:
    b = balancer(period_s=30.0)
    report_both(b, counts(), phy2log=default())
    # A whole second, so that now + 30 and now + 60 are exact: (now + 60.0) - (now + 30.0) could otherwise
    # round below the 30 s period.
    now = float(math.ceil(time.monotonic()))
    assert b.decide(KEY, now=now) is None  # the group was met just now
    assert len(b.groups[KEY].windows) == 2
    first = b.decide(KEY, now=now + 30.0)
    assert first is not None and first.version == 1
    # The ranks switch and report a load that the new placement balances badly.
    report_both(b, counts(hot=singles_on_rank0(first.phy2log)), version=1, phy2log=first.phy2log, t_end=1010.0)
    assert b.decide(KEY, now=now + 59.0) is None  # 29 s after the last decision
    second = b.decide(KEY, now=now + 60.0)
    assert second is not None and second.version == 2
    assert second.expected_balancedness > second.previous_balancedness


def test_window_forgets_load_older_than_window_s() -> None:
    b = balancer(window_s=10.0)
    a, c, d = counts(), counts(hot=(5,)), counts(hot=(6,))
    b.report(KEY, shape(), 0, default(), 100.0, a)
    b.report(KEY, shape(), 0, None, 105.0, c)
    group = b.groups[KEY]
    assert torch.equal(group.load(), a + c)
    b.report(KEY, shape(), 0, None, 110.0, d)  # exactly window_s after the first: still inside
    assert torch.equal(group.load(), a + c + d)
    b.report(KEY, shape(), 0, None, 110.5, d)  # the first window ended 10.5 s before the newest: gone
    assert torch.equal(group.load(), c + 2 * d)
    assert [t for t, _ in group.windows] == [105.0, 110.0, 110.5]
    b.report(KEY, shape(), 0, None, 200.0, a)
    assert torch.equal(group.load(), a) and len(group.windows) == 1


def test_reports_of_an_older_placement_are_dropped_after_a_publish() -> None:
    b = balancer()
    report_both(b, counts(), phy2log=default())
    p = b.decide(KEY, now=later(b))
    assert p is not None and p.version == 1
    group = b.groups[KEY]
    # Ranks that have not switched yet keep reporting version 0: their windows describe the old placement.
    report_both(b, counts(), phy2log=default(), t_end=1001.0)
    assert len(group.windows) == 0 and group.placement is p
    assert torch.equal(group.placement.phy2log, p.phy2log)  # the old phy2log is not re-adopted
    # Once switched, they report version 1 (with the placement on the first report after the switch).
    report_both(b, counts(), version=1, phy2log=p.phy2log, t_end=1002.0)
    assert len(group.windows) == 2 and torch.equal(group.load(), 2 * counts())
    assert group.balancedness().tolist() == pytest.approx([mean_balancedness(2 * counts(), p.phy2log)] * L)


def test_a_newer_version_with_its_placement_is_adopted() -> None:
    # A balancer that restarted meets a group that already runs placement 3.
    b = balancer()
    placement3 = torch.tensor([[2, 3, 0, 1, 4, 5, 6, 7, 2, 3]] * L)
    report_both(b, counts(), version=3, phy2log=placement3)
    group = b.groups[KEY]
    assert group.placement.version == 3 and torch.equal(group.placement.phy2log, placement3)
    assert len(group.windows) == 2
    # Placement 3 already balances this load (2 and 3 on both ranks): nothing to do.
    assert group.balancedness().tolist() == pytest.approx([1.0] * L)
    assert b.decide(KEY, now=later(b)) is None

    # A group at version 0 whose ranks report a later version with its placement (e.g. published by a balancer
    # that ran before this one) is now at that version.
    b = balancer()
    report_both(b, counts(), phy2log=default())
    b.report(KEY, shape(), 2, placement3, 1001.0, counts(hot=(5, 6)))
    group = b.groups[KEY]
    assert group.placement.version == 2 and torch.equal(group.placement.phy2log, placement3)
    assert torch.equal(group.windows[-1][1], counts(hot=(5, 6)))
    p = b.decide(KEY, now=later(b))
    assert p is not None and p.version == 3
    assert p.num_moved_slots == int((p.phy2log != placement3).sum())


def test_a_newer_version_without_its_placement_is_dropped() -> None:
    b = balancer()
    report_both(b, counts(), phy2log=default())
    group = b.groups[KEY]
    b.report(KEY, shape(), 1, None, 1001.0, counts(hot=(5,)))
    assert group.placement.version == 0 and torch.equal(group.placement.phy2log, default())
    assert len(group.windows) == 2 and torch.equal(group.load(), 2 * counts())


def test_a_group_met_without_its_placement_assumes_the_start_up_one() -> None:
    b = balancer()
    b.report(KEY, shape(), 0, None, 1000.0, counts())
    group = b.groups[KEY]
    assert group.placement.version == 0
    assert group.placement.phy2log.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 0, 1]] * L
    assert group.shape == shape() and len(group.windows) == 1


def test_groups_are_kept_apart() -> None:
    b = balancer()
    prefill = ("decode-0", 1)
    b.report(KEY, shape(), 0, default(), 1000.0, counts())
    b.report(prefill, shape(8), 0, None, 1000.0, counts(hot=(7,)))
    assert set(b.groups) == {KEY, prefill}
    assert torch.equal(b.groups[KEY].load(), counts()) and torch.equal(b.groups[prefill].load(), counts(hot=(7,)))
    assert b.groups[prefill].placement.phy2log.shape == (L, 8)


def test_a_shape_change_resets_the_group() -> None:
    b = balancer()
    report_both(b, counts(), phy2log=default())
    p = b.decide(KEY, now=later(b))
    assert p is not None and p.version == 1
    report_both(b, counts(), version=1, phy2log=p.phy2log, t_end=1001.0)
    # The instance restarts with 8 slots instead of 10: what the balancer knew no longer applies.
    before = time.monotonic()
    b.report(KEY, shape(8), 0, None, 1002.0, counts(hot=(6,)))
    group = b.groups[KEY]
    assert group.shape == shape(8)
    assert group.placement.version == 0 and torch.equal(group.placement.phy2log, default(8))
    assert len(group.windows) == 1 and torch.equal(group.load(), counts(hot=(6,)))
    assert group.last_decision >= before  # a new period starts
    assert b.decide(KEY, now=before) is None


def test_an_assumed_placement_is_replaced_by_the_one_the_ranks_send() -> None:
    # A balancer that restarted meets a rank of a group at version 3 mid-stream (no phy2log on the report): it
    # assumes the start-up placement until the rank resends its placement on its next stream...
    b = balancer()
    placement3 = torch.tensor([[2, 3, 0, 1, 4, 5, 6, 7, 2, 3]] * L)
    b.report(KEY, shape(), 3, None, 1000.0, counts())
    assert torch.equal(b.groups[KEY].placement.phy2log, default())
    # ...which it does, at the same version 3: from then on the balancer must judge the load under it.
    b.report(KEY, shape(), 3, placement3, 1001.0, counts())
    group = b.groups[KEY]
    assert group.placement.version == 3
    assert torch.equal(group.placement.phy2log, placement3)
