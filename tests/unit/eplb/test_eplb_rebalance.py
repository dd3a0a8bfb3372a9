"""Tests of the EPLB algorithm (`moemesh.services.eplb.rebalance`, with `guards` and `placement_moves`), its measures
(`balance`) and the stats file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moemesh.ep.placement import ExpertPlacement
from moemesh.services.eplb.balance import balancedness, moved_slots, rank_loads
from moemesh.services.eplb.guards import RebalanceError, never_worse_than_trivial
from moemesh.services.eplb.placement_moves import align_to_previous, minimize_moves
from moemesh.services.eplb.rebalance import (
    balanced_packing,
    rebalance,
    rebalance_experts,
    rebalance_experts_hierarchical,
    replicate_experts,
    resolve_policy,
)
from moemesh.services.eplb.simulate import SimulationError, simulate
from moemesh.telemetry import expert_load
from moemesh.telemetry.expert_load_file import StatsFileError, append_window, read_windows

# DeepSeek's published example (github.com/deepseek-ai/EPLB): 2 layers x 12 experts, 16 slots, 4 groups,
# 2 nodes, 8 ranks.
EXAMPLE_WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                  [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
EXAMPLE_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                   [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]

# (E logical, P physical, G groups, N nodes, R ranks)
SHAPES = [
    (12, 12, 4, 1, 4),  # P == E
    (16, 16, 4, 2, 8),  # P == E, one slot per rank
    (12, 18, 4, 2, 6),  # P not a multiple of the groups
    (16, 20, 4, 1, 5),  # one node
    (12, 16, 4, 2, 8),  # the example's shape
    (32, 48, 8, 4, 8),  # several nodes
    (24, 30, 3, 2, 6),  # groups do not divide over nodes: auto is global
    (8, 32, 2, 1, 4),  # P = 4E
    (64, 80, 8, 2, 16),
]


def skewed(num_layers: int, num_experts: int, seed: int, s: float = 1.1) -> torch.Tensor:
    """[L, E] Zipf-like token counts: expert ranks shuffled per layer, with noise."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(num_experts, generator=g) for _ in range(num_layers)]) + 1
    noise = 0.5 + torch.rand(num_layers, num_experts, generator=g, dtype=torch.float64)
    return (1e4 * noise / ranks.double() ** s).round().long()


def trivial(num_layers: int, num_logical: int, num_physical: int, num_ranks: int) -> torch.Tensor:
    return ExpertPlacement.default(num_layers, num_logical, num_ranks, num_physical - num_logical).phy2log


def rank_sets(phy2log: torch.Tensor, num_ranks: int) -> list[list[list[int]]]:
    """[L] lists of each rank's experts, sorted."""
    layers, slots = phy2log.shape
    return [[sorted(r) for r in row] for row in phy2log.view(layers, num_ranks, slots // num_ranks).tolist()]


# ---- the published example ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["hierarchical", "auto"])
def test_published_example(policy: str) -> None:
    phy2log, log2phy, logcnt = rebalance(torch.tensor(EXAMPLE_WEIGHT), 16, 4, 2, 8, policy=policy)
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert phy2log.tolist() == EXAMPLE_PHY2LOG
    assert logcnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    assert log2phy.shape == (2, 12, 2)
    assert log2phy[0, 1].tolist() == [13, 15] and log2phy[0, 0].tolist() == [12, -1]


def test_reference_entry_has_the_reference_results() -> None:
    """`rebalance_experts` as DeepSeek's: (phy2log, log2phy in replica order, logcnt) for the published example."""
    weight = torch.tensor(EXAMPLE_WEIGHT)
    phy2log, log2phy, logcnt = rebalance_experts(weight, 16, 4, 2, 8)
    assert phy2log.tolist() == EXAMPLE_PHY2LOG
    assert logcnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    _, phyrank, _ = rebalance_experts_hierarchical(weight.double(), 16, 4, 2, 8)
    for layer in range(2):
        for e in range(12):
            n = int(logcnt[layer, e])
            assert (log2phy[layer, e, n:] == -1).all()
            assert sorted(log2phy[layer, e, :n].tolist()) == [s for s in range(16) if EXAMPLE_PHY2LOG[layer][s] == e]
        for slot in range(16):  # replica k of an expert is listed k-th
            assert int(log2phy[layer, EXAMPLE_PHY2LOG[layer][slot], phyrank[layer, slot]]) == slot
    with pytest.raises(RebalanceError, match="not divisible by num_ranks"):
        rebalance_experts(weight, 18, 4, 2, 8)


def test_balanced_packing_by_hand() -> None:
    weight = torch.tensor([[5.0, 4, 3, 2, 1, 1]], dtype=torch.float64)
    # Heaviest first onto the lightest pack with room: 5 -> p0; 4 -> p1; 3 -> p1 (4 < 5); 2 -> p0 (5 < 7);
    # the first 1 -> p0 (7 = 7: the lower index), which is then full; the last 1 -> p1.
    pack, nth = balanced_packing(weight, 2)
    assert pack.tolist() == [[0, 1, 1, 0, 0, 1]] and nth.tolist() == [[0, 0, 1, 1, 2, 2]]
    # Labelled: the 2 shares item 0's label, so it passes over p0 for p1 (still with room); the 1s fill p0.
    pack, nth = balanced_packing(weight, 2, labels=torch.tensor([[0, 1, 2, 0, 3, 4]]))
    assert pack.tolist() == [[0, 1, 1, 1, 0, 0]] and nth.tolist() == [[0, 0, 1, 2, 1, 2]]


def test_replicate_experts_by_hand() -> None:
    # Loads 6, 3, 2 over 5 replicas: the 4th goes to expert 0 (6 per replica), the 5th to the tie of expert 0
    # (6/2) and expert 1 (3/1): the one with fewer replicas.
    phy2log, rank, logcnt = replicate_experts(torch.tensor([[6.0, 3.0, 2.0]], dtype=torch.float64), 5)
    assert phy2log.tolist() == [[0, 1, 2, 0, 1]]
    assert rank.tolist() == [[0, 0, 0, 1, 1]]
    assert logcnt.tolist() == [[2, 2, 1]]


def test_guard_keeps_the_trivial_placement_where_it_balances_better() -> None:
    weight = torch.tensor([[10.0, 1, 10, 1], [10, 10, 1, 1]], dtype=torch.float64)
    swapped = torch.tensor([[0, 2, 1, 3], [0, 2, 1, 3]])  # rank loads 20 | 2, then 11 | 11 (trivial: 11 | 11, 20 | 2)
    assert never_worse_than_trivial(weight, swapped, 2).tolist() == [[0, 1, 2, 3], [0, 2, 1, 3]]


def test_auto_policy() -> None:
    assert resolve_policy("auto", 4, 2) == "hierarchical"
    assert resolve_policy("auto", 3, 2) == "global"
    assert resolve_policy("global", 4, 2) == "global"
    with pytest.raises(RebalanceError, match="divisible by num_nodes"):
        resolve_policy("hierarchical", 3, 2)
    with pytest.raises(RebalanceError, match="policy must be one of"):
        resolve_policy("best", 4, 2)


# ---- properties over skewed loads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "E{}-P{}-G{}-N{}-R{}".format(*s))
@pytest.mark.parametrize("policy", ["auto", "global"])
def test_properties(shape: tuple[int, int, int, int, int], policy: str) -> None:
    num_logical, num_physical, num_groups, num_nodes, num_ranks = shape
    resolved = resolve_policy(policy, num_groups, num_nodes)
    per_rank = num_physical // num_ranks
    for seed, s in ((0, 0.6), (1, 1.1), (2, 1.6)):
        weight = skewed(4, num_logical, seed, s)
        phy2log, log2phy, logcnt = rebalance(weight, num_physical, num_groups, num_nodes, num_ranks, policy)
        assert phy2log.shape == (4, num_physical) and logcnt.shape == (4, num_logical)
        # log2phy agrees with phy2log, every expert has a slot, the slots add up
        reference = ExpertPlacement(phy2log, num_ranks, num_logical)
        assert torch.equal(reference.log2phy, log2phy) and torch.equal(reference.logcnt, logcnt)
        assert (logcnt >= 1).all() and (logcnt.sum(1) == num_physical).all()
        for layer in range(4):
            for e in range(num_logical):
                slots = log2phy[layer, e]
                assert (slots[: logcnt[layer, e]] >= 0).all() and (slots[logcnt[layer, e]:] == -1).all()
                assert (phy2log[layer, slots[: logcnt[layer, e]]] == e).all()
        # replicas of one expert on distinct ranks, as far as the count (and the node) allows
        ranks = phy2log.view(4, num_ranks, per_rank)
        room = num_ranks // num_nodes if resolved == "hierarchical" else num_ranks
        for layer in range(4):
            for e in range(num_logical):
                holding = int((ranks[layer] == e).any(1).sum())
                assert holding >= min(int(logcnt[layer, e]), room), (seed, layer, e)
        # never worse than the trivial placement
        before = balancedness(weight, trivial(4, num_logical, num_physical, num_ranks), num_ranks)
        after = balancedness(weight, phy2log, num_ranks)
        assert (after >= before - 1e-12).all()


@pytest.mark.parametrize("shape", [(12, 16, 4, 2, 8), (32, 48, 8, 4, 8), (64, 80, 8, 2, 16)])
def test_hierarchical_keeps_groups_on_one_node(shape: tuple[int, int, int, int, int]) -> None:
    num_logical, num_physical, num_groups, num_nodes, num_ranks = shape
    weight = skewed(3, num_logical, seed=5, s=0.8)
    phy2log = rebalance(weight, num_physical, num_groups, num_nodes, num_ranks, "hierarchical").phy2log
    fallback = trivial(3, num_logical, num_physical, num_ranks)
    group_size, per_node = num_logical // num_groups, num_physical // num_nodes
    checked = 0
    for layer in range(3):
        if torch.equal(phy2log[layer], fallback[layer]):
            continue  # the balancer kept the trivial placement, which ignores nodes
        node_of_slot = torch.arange(num_physical) // per_node
        for group in range(num_groups):
            in_group = (phy2log[layer] // group_size) == group
            assert node_of_slot[in_group].unique().numel() == 1, (layer, group)
        checked += 1
    assert checked


def test_global_spreads_the_heaviest_expert() -> None:
    weight = torch.tensor([[1000, 1, 1, 1, 1, 1, 1, 1]])
    phy2log, _, logcnt = rebalance(weight, 16, 1, 1, 8, "global")
    assert logcnt[0].tolist() == [9] + [1] * 7  # all 8 redundant slots go to the hot expert
    assert ((phy2log.view(8, 2) == 0).sum(1) >= 1).all()  # a replica on every rank


def test_zero_load_spreads_redundant_slots() -> None:
    phy2log, _, logcnt = rebalance(torch.zeros(2, 8), 12, 2, 1, 4)
    assert int(logcnt.max()) == 2 and (logcnt.sum(1) == 12).all()
    assert balancedness(torch.zeros(2, 8), phy2log, 4).tolist() == [1.0, 1.0]


@pytest.mark.parametrize(("args", "match"), [
    ((torch.ones(2, 12), 8, 4, 2, 8), "cannot hold"),
    ((torch.ones(2, 12), 18, 4, 2, 8), "not divisible by num_ranks"),
    ((torch.ones(2, 12), 16, 5, 1, 8), "does not divide the 12"),
    ((torch.ones(2, 12), 16, 4, 3, 8), "does not divide num_ranks"),
    ((torch.ones(12), 16, 4, 2, 8), r"\[L, E\]"),
    ((-torch.ones(2, 12), 16, 4, 2, 8), ">= 0"),
    ((torch.full((2, 12), float("nan")), 16, 4, 2, 8), "finite"),
    ((torch.ones(2, 12), 0, 4, 2, 8), "positive int"),
])
def test_bad_arguments(args: tuple, match: str) -> None:
    with pytest.raises(RebalanceError, match=match):
        rebalance(*args)


# ---- measures -----------------------------------------------------------------------------------------------------


def test_balancedness_splits_load_over_replicas() -> None:
    weight = torch.tensor([[6.0, 2.0, 2.0]])
    phy2log = torch.tensor([[0, 1, 0, 2]])  # rank 0: 3 + 2, rank 1: 3 + 2
    assert rank_loads(weight, phy2log, 2).tolist() == [[5.0, 5.0]]
    assert balancedness(weight, phy2log, 2).tolist() == [1.0]
    assert balancedness(weight, torch.tensor([[0, 0, 1, 2]]), 2).tolist() == [pytest.approx(5 / 6)]


def test_balancedness_matches_telemetry_for_the_contiguous_placement() -> None:
    weight = skewed(3, 16, seed=3)
    identity = torch.arange(16).repeat(3, 1)
    assert torch.allclose(balancedness(weight, identity, 4), expert_load.balancedness(weight, 4))


def test_moved_slots() -> None:
    old = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    assert moved_slots(old, torch.tensor([[0, 1, 2, 3], [1, 0, 2, 2]])).tolist() == [0, 3]
    with pytest.raises(ValueError, match="differ in shape"):
        moved_slots(old, old[:, :2])


# ---- fewer moves --------------------------------------------------------------------------------------------------


def shuffled(phy2log: torch.Tensor, num_ranks: int, num_nodes: int, seed: int) -> torch.Tensor:
    """phy2log with nodes, ranks within nodes and slots within ranks permuted: the same balance."""
    g = torch.Generator().manual_seed(seed)
    layers, slots = phy2log.shape
    per_node, per_rank = num_ranks // num_nodes, slots // num_ranks
    x = phy2log.view(layers, num_nodes, per_node, per_rank)
    x = x[:, torch.randperm(num_nodes, generator=g)][:, :, torch.randperm(per_node, generator=g)]
    return x[:, :, :, torch.randperm(per_rank, generator=g)].reshape(layers, slots)


@pytest.mark.parametrize("shape", [(12, 16, 4, 2, 8), (32, 48, 8, 4, 8), (24, 30, 3, 2, 6), (64, 80, 8, 2, 16)])
def test_unchanged_load_moves_nothing(shape: tuple[int, int, int, int, int]) -> None:
    num_logical, num_physical, num_groups, num_nodes, num_ranks = shape
    nodes = num_nodes if resolve_policy("auto", num_groups, num_nodes) == "hierarchical" else 1
    weight = skewed(3, num_logical, seed=7)
    new = rebalance(weight, num_physical, num_groups, num_nodes, num_ranks).phy2log
    previous = shuffled(new, num_ranks, nodes, seed=1)
    assert moved_slots(previous, new).sum() > 0
    assert moved_slots(previous, align_to_previous(new, previous, num_ranks, nodes)).tolist() == [0, 0, 0]
    again = rebalance(weight, num_physical, num_groups, num_nodes, num_ranks, previous=previous, tolerance=0.0)
    assert torch.equal(again.phy2log, previous)


@pytest.mark.parametrize("shape", [(12, 16, 4, 2, 8), (32, 48, 8, 4, 8), (24, 30, 3, 2, 6), (16, 20, 4, 1, 5),
                                   (64, 80, 8, 2, 16)])
def test_minimising_moves_keeps_the_balance(shape: tuple[int, int, int, int, int]) -> None:
    num_logical, num_physical, num_groups, num_nodes, num_ranks = shape
    nodes = num_nodes if resolve_policy("auto", num_groups, num_nodes) == "hierarchical" else 1
    for seed in range(3):
        old_weight = skewed(3, num_logical, seed=seed)
        g = torch.Generator().manual_seed(100 + seed)
        weight = (old_weight * (0.7 + 0.6 * torch.rand(old_weight.shape, generator=g))).round()
        previous = rebalance(old_weight, num_physical, num_groups, num_nodes, num_ranks).phy2log
        plain = rebalance(weight, num_physical, num_groups, num_nodes, num_ranks).phy2log

        aligned = align_to_previous(plain, previous, num_ranks, nodes)
        assert torch.allclose(balancedness(weight, aligned, num_ranks), balancedness(weight, plain, num_ranks),
                              rtol=1e-12)
        assert (moved_slots(previous, aligned) <= moved_slots(previous, plain)).all()
        per_node = num_ranks // nodes
        node_sets = [sorted(map(sorted, (r[i:i + per_node] for i in range(0, num_ranks, per_node))))
                     for r in rank_sets(plain, num_ranks)]
        assert node_sets == [sorted(map(sorted, (r[i:i + per_node] for i in range(0, num_ranks, per_node))))
                             for r in rank_sets(aligned, num_ranks)]  # whole ranks moved within whole nodes

        report = minimize_moves(weight, plain, previous, num_ranks, nodes, tolerance=0.0)
        assert torch.equal(report.moved_before, moved_slots(previous, plain))
        assert (report.moved_after <= report.moved_before).all()
        after = balancedness(weight, report.phy2log, num_ranks)
        assert (after >= balancedness(weight, plain, num_ranks) - 1e-12).all()
        via_rebalance = rebalance(weight, num_physical, num_groups, num_nodes, num_ranks, previous=previous,
                                  tolerance=0.0)
        assert torch.equal(via_rebalance.phy2log, report.phy2log)


def test_tolerance_keeps_a_good_enough_previous_placement() -> None:
    weight = torch.tensor(EXAMPLE_WEIGHT)
    previous = rebalance(weight, 16, 4, 2, 8, "hierarchical").phy2log  # 0.83 / 0.81
    plain = rebalance(weight, 16, 4, 2, 8, "global").phy2log  # 0.93 / 0.84
    strict = minimize_moves(weight, plain, previous, 8, 1, tolerance=0.0)
    assert strict.kept_previous.tolist() == [False, False] and (strict.moved_after > 0).all()
    loose = minimize_moves(weight, plain, previous, 8, 1, tolerance=0.15)
    assert loose.kept_previous.tolist() == [True, True]
    assert loose.moved_after.tolist() == [0, 0] and torch.equal(loose.phy2log, previous)
    mixed = minimize_moves(weight, plain, previous, 8, 1, tolerance=0.05)
    assert mixed.kept_previous.tolist() == [False, True]


def test_previous_placement_is_checked() -> None:
    weight = torch.tensor(EXAMPLE_WEIGHT)
    with pytest.raises(RebalanceError, match="must agree"):
        rebalance(weight, 16, 4, 2, 8, previous=torch.zeros(2, 12, dtype=torch.int64))
    with pytest.raises(RebalanceError, match="previous placement: logical expert"):
        rebalance(weight, 16, 4, 2, 8, previous=torch.zeros(2, 16, dtype=torch.int64))


# ---- stats file ---------------------------------------------------------------------------------------------------


def test_stats_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "load.jsonl"
    append_window(path, torch.tensor([[1, 2, 3], [4, 5, 6]]), role="decode", instance_id="d0", rank=1, t=10.5)
    append_window(path, [[0, 0, 1], [1, 0, 0]], role="prefill", instance_id="p0", rank=0)
    windows = read_windows(path)
    assert [(w.role, w.instance_id, w.rank) for w in windows] == [("decode", "d0", 1), ("prefill", "p0", 0)]
    assert windows[0].t == 10.5 and windows[1].t > 1e9
    assert windows[0].counts.dtype == torch.int64 and windows[0].counts.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert len(path.read_text().splitlines()) == 2


@pytest.mark.parametrize(("line", "match"), [
    ("not json", "not a JSON object"),
    ("[1, 2]", "expected a JSON object"),
    ('{"t": 1, "role": "decode", "instance_id": "x", "rank": 0}', "missing key"),
    ('{"t": 1, "role": "train", "instance_id": "x", "rank": 0, "counts": [[1]]}', "role must be"),
    ('{"t": 1, "role": "decode", "instance_id": "x", "rank": -1, "counts": [[1]]}', "rank must be"),
    ('{"t": 1, "role": "decode", "instance_id": "x", "rank": 0, "counts": [[1], [1, 2]]}', "differ in length"),
    ('{"t": 1, "role": "decode", "instance_id": "x", "rank": 0, "counts": [[1.5]]}', "ints >= 0"),
    ('{"t": 1, "role": "decode", "instance_id": "x", "rank": 0, "counts": [[1, 2]]}', r"shape \[1, 2\]"),
])
def test_stats_file_errors_name_path_and_line(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "load.jsonl"
    good = json.dumps({"t": 0, "role": "decode", "instance_id": "x", "rank": 0, "counts": [[1]]})
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(StatsFileError, match=match) as info:
        read_windows(path)
    assert str(info.value).startswith(f"{path}:3: ")


def test_stats_file_writer_refuses_bad_windows(tmp_path: Path) -> None:
    with pytest.raises(StatsFileError, match="integers"):
        append_window(tmp_path / "x.jsonl", torch.ones(2, 3), role="decode", instance_id="d", rank=0)
    with pytest.raises(StatsFileError, match="role must be"):
        append_window(tmp_path / "x.jsonl", [[1]], role="both", instance_id="d", rank=0)
    with pytest.raises(StatsFileError, match="cannot read"):
        read_windows(tmp_path / "missing.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


# ---- simulation ---------------------------------------------------------------------------------------------------


def test_simulation_on_a_steady_load(tmp_path: Path) -> None:
    path = tmp_path / "load.jsonl"
    g = torch.Generator().manual_seed(0)
    popularity = skewed(2, 32, seed=4, s=1.0).double()
    for step in range(6):
        for rank in range(2):
            ids = torch.multinomial(popularity, 3000, replacement=True, generator=g)
            counts = torch.zeros(2, 32, dtype=torch.int64).scatter_add_(1, ids, torch.ones_like(ids))
            append_window(path, counts, role="decode", instance_id="d0", rank=rank, t=100.0 + step)
    append_window(path, torch.ones(2, 32, dtype=torch.int64), role="prefill", instance_id="p0", rank=0, t=1.0)
    sim = simulate(read_windows(path), num_ranks=8, num_groups=4, num_nodes=2, redundant=[0, 8, 16])
    assert (sim.policy, sim.history_windows, sim.future_windows) == ("refined-hierarchical", 6, 6)
    assert [row.num_physical for row in sim.rows] == [32, 40, 48]
    for row in sim.rows:
        trivial_mean, rebalanced, oracle = row.means()
        assert rebalanced >= trivial_mean - 1e-9 and oracle >= trivial_mean - 1e-9
    assert sim.rows[-1].means()[1] > sim.rows[0].means()[1]  # redundancy helps a skewed load
    with pytest.raises(SimulationError, match="not divisible by num_ranks"):
        simulate(read_windows(path), num_ranks=8, num_groups=4, num_nodes=2, redundant=[4])
    with pytest.raises(SimulationError, match="no windows with role 'decode'"):
        simulate(read_windows(path)[-1:], num_ranks=8, num_groups=4, num_nodes=2, redundant=[0])
