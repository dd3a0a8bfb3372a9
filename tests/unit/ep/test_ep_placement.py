"""Tests of `ExpertPlacement`: the slot tables, the file format, and logical -> physical routing."""

from __future__ import annotations

import json

import pytest
import torch

from moemesh.ep.placement import ExpertPlacement, PlacementError


def check_tables(p: ExpertPlacement) -> None:
    """log2phy/logcnt agree with phy2log: every slot listed exactly once, under its own expert, in slot order."""
    assert p.log2phy.dtype == torch.int64 and p.logcnt.dtype == torch.int64
    assert p.log2phy.shape == (p.num_layers, p.num_logical, int(p.logcnt.max()))
    assert p.logcnt.shape == (p.num_layers, p.num_logical)
    assert (p.logcnt.sum(dim=1) == p.num_physical).all()
    assert (p.logcnt >= 1).all()
    for layer in range(p.num_layers):
        seen = []
        for e in range(p.num_logical):
            n = int(p.logcnt[layer, e])
            row = p.log2phy[layer, e]
            assert (row[n:] == -1).all()
            slots = row[:n].tolist()
            assert slots == sorted(slots)
            assert all(int(p.phy2log[layer, s]) == e for s in slots)
            seen += slots
        assert sorted(seen) == list(range(p.num_physical))


def test_default_without_redundancy():
    p = ExpertPlacement.default(num_layers=3, num_logical=8, ep_size=4)
    assert (p.num_layers, p.num_physical, p.num_logical, p.slots_per_rank) == (3, 8, 8, 2)
    assert p.phy2log.dtype == torch.int64
    assert (p.phy2log == torch.arange(8)).all()
    assert (p.logcnt == 1).all()
    assert p.log2phy.shape == (3, 8, 1)
    assert (p.log2phy[:, :, 0] == torch.arange(8)).all()
    check_tables(p)


def test_default_with_redundancy():
    p = ExpertPlacement.default(num_layers=2, num_logical=6, ep_size=4, redundant=2)
    assert p.num_physical == 8 and p.slots_per_rank == 2
    assert p.phy2log[1].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert p.logcnt[0].tolist() == [2, 2, 1, 1, 1, 1]
    assert p.log2phy[0, 0].tolist() == [0, 6] and p.log2phy[0, 1].tolist() == [1, 7]
    assert p.log2phy[0, 2].tolist() == [2, -1]
    check_tables(p)


def test_default_more_redundant_than_experts_wraps():
    p = ExpertPlacement.default(num_layers=1, num_logical=2, ep_size=3, redundant=4)
    assert p.phy2log[0].tolist() == [0, 1, 0, 1, 0, 1]
    check_tables(p)


def test_default_divisibility_error_names_the_numbers():
    with pytest.raises(PlacementError) as info:
        ExpertPlacement.default(num_layers=2, num_logical=8, ep_size=3, redundant=2)
    msg = str(info.value)
    assert "10" in msg and "8" in msg and "2" in msg and "ep_size = 3" in msg
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_layers=0, num_logical=4, ep_size=1),
        dict(num_layers=1, num_logical=0, ep_size=1),
        dict(num_layers=1, num_logical=4, ep_size=0),
        dict(num_layers=1, num_logical=4, ep_size=1, redundant=-1),
    ],
)
def test_default_rejects_bad_sizes(kwargs):
    with pytest.raises(PlacementError):
        ExpertPlacement.default(**kwargs)


def test_custom_placement_tables():
    phy2log = torch.tensor([[3, 0, 1, 3, 2, 3], [0, 1, 2, 3, 1, 0]])
    p = ExpertPlacement(phy2log, ep_size=3)
    assert p.num_logical == 4
    assert p.logcnt.tolist() == [[1, 1, 1, 3], [2, 2, 1, 1]]
    assert p.log2phy[0, 3].tolist() == [0, 3, 5]
    assert p.log2phy[1, 0].tolist() == [0, 5, -1]
    check_tables(p)


def test_constructor_validation():
    with pytest.raises(PlacementError, match="not divisible"):
        ExpertPlacement(torch.tensor([[0, 1, 2]]), ep_size=2)
    with pytest.raises(PlacementError, match="expert 2 has no physical slot in MoE layer 1"):
        ExpertPlacement(torch.tensor([[0, 1, 2, 0], [0, 1, 1, 0]]), ep_size=2, num_logical=3)
    with pytest.raises(PlacementError, match="range"):
        ExpertPlacement(torch.tensor([[0, 1, 2, 4]]), ep_size=2, num_logical=4)
    with pytest.raises(PlacementError, match="range"):
        ExpertPlacement(torch.tensor([[0, 1, -1, 2]]), ep_size=2)
    with pytest.raises(PlacementError, match="2-D"):
        ExpertPlacement(torch.tensor([0, 1]), ep_size=1)
    with pytest.raises(PlacementError, match="integer"):
        ExpertPlacement(torch.tensor([[0.0, 1.0]]), ep_size=1)
    with pytest.raises(PlacementError, match="ep_size"):
        ExpertPlacement(torch.tensor([[0, 1]]), ep_size=0)
    # max(phy2log) + 1 must agree with a given num_logical: expert 3 is missing here.
    with pytest.raises(PlacementError, match="expert 3"):
        ExpertPlacement(torch.tensor([[0, 1, 2, 0]]), ep_size=1, num_logical=4)


def test_local_slots_and_rank_of_slot():
    p = ExpertPlacement.default(num_layers=1, num_logical=10, ep_size=4, redundant=2)
    assert [p.local_slots(r) for r in range(4)] == [range(0, 3), range(3, 6), range(6, 9), range(9, 12)]
    for r in range(4):
        assert all(p.rank_of_slot(s) == r for s in p.local_slots(r))
    slots = torch.arange(12)
    assert p.rank_of_slot(slots).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    with pytest.raises(PlacementError):
        p.local_slots(4)
    with pytest.raises(PlacementError):
        p.rank_of_slot(12)


def test_file_roundtrip(tmp_path):
    phy2log = torch.tensor([[3, 0, 1, 3, 2, 3], [0, 1, 2, 3, 1, 0]])
    p = ExpertPlacement(phy2log, ep_size=2, num_logical=4)
    path = tmp_path / "placement.json"
    p.to_file(path)
    data = json.loads(path.read_text())
    assert data == {"ep_size": 2, "phy2log": phy2log.tolist()}
    q = ExpertPlacement.from_file(path, num_logical=4)
    assert q.ep_size == 2 and q.num_logical == 4
    for name in ("phy2log", "log2phy", "logcnt"):
        assert torch.equal(getattr(p, name), getattr(q, name))
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected an object"),
        ('{"phy2log": [[0, 1]]}', "missing key"),
        ('{"ep_size": "2", "phy2log": [[0, 1]]}', "ep_size must be an int"),
        ('{"ep_size": 1, "phy2log": []}', "non-empty list of lists"),
        ('{"ep_size": 1, "phy2log": [0, 1]}', "non-empty list of lists"),
        ('{"ep_size": 1, "phy2log": [[0, 1], [0]]}', "differ in length"),
        ('{"ep_size": 1, "phy2log": [[0, 1.5]]}', "must be ints"),
        ('{"ep_size": 3, "phy2log": [[0, 1]]}', "not divisible"),
        ('{"ep_size": 1, "phy2log": [[0, 0]]}', "expert 1 has no physical slot"),
        ('{"ep_size": 1, "phy2log": [[0, 2]]}', "range"),
    ],
)
def test_from_file_malformed(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(PlacementError, match=match) as info:
        ExpertPlacement.from_file(path, num_logical=2)
    assert "bad.json" in str(info.value)


def test_from_file_missing(tmp_path):
    with pytest.raises(PlacementError, match="cannot read"):
        ExpertPlacement.from_file(tmp_path / "nope.json", num_logical=2)


def test_physical_ids_maps_back_to_logical():
    p = ExpertPlacement(torch.tensor([[3, 0, 1, 3, 2, 3, 0, 2], [0, 1, 2, 3, 3, 2, 1, 0]]), ep_size=4)
    gen = torch.Generator().manual_seed(0)
    topk_ids = torch.randint(0, 4, (50, 3), generator=gen)
    for layer in range(2):
        phys = p.physical_ids(layer, topk_ids)
        assert phys.shape == topk_ids.shape and phys.dtype == torch.int64
        assert torch.equal(p.phy2log[layer][phys], topk_ids)


def test_physical_ids_formula_and_spread():
    p = ExpertPlacement.default(num_layers=1, num_logical=4, ep_size=2, redundant=4)  # every expert twice
    # T=3, K=2: replica index of (t, k) is (t * 2 + k) % 2.
    ids = torch.tensor([[0, 1], [0, 0], [2, 2]])
    assert p.physical_ids(0, ids).tolist() == [[0, 5], [0, 4], [2, 6]]

    q = ExpertPlacement(torch.tensor([[0, 0, 0, 1, 2, 1]]), ep_size=3)  # expert 0 x3, expert 1 x2, expert 2 x1
    t, k = 3000, 4
    ids = torch.randint(0, 3, (t, k), generator=torch.Generator().manual_seed(1))
    phys = q.physical_ids(0, ids)
    for e in range(3):
        counts = torch.bincount(phys[ids == e], minlength=6)[q.log2phy[0, e, : q.logcnt[0, e]]]
        assert counts.sum() == (ids == e).sum()
        assert counts.max() - counts.min() <= 0.1 * counts.float().mean()


def test_physical_ids_all_tokens_to_one_expert_spreads_exactly():
    p = ExpertPlacement(torch.tensor([[0, 1, 0, 0]]), ep_size=2)
    ids = torch.zeros(30, 2, dtype=torch.int64)
    counts = torch.bincount(p.physical_ids(0, ids).reshape(-1), minlength=4)
    assert counts.tolist() == [20, 0, 20, 20]


def test_physical_ids_deterministic_and_edge_cases():
    p = ExpertPlacement.default(num_layers=2, num_logical=8, ep_size=4, redundant=4)
    ids = torch.randint(0, 8, (64, 8), generator=torch.Generator().manual_seed(2))
    first = p.physical_ids(1, ids)
    for _ in range(3):
        assert torch.equal(p.physical_ids(1, ids.clone()), first)
    assert p.physical_ids(0, torch.empty(0, 8, dtype=torch.int64)).shape == (0, 8)
    padded = torch.tensor([[0, -1], [-1, 5], [-1, 3]])  # pos 5: expert 5 has one slot; pos 5: expert 3 replica 1
    assert p.physical_ids(0, padded).tolist() == [[0, -1], [-1, 5], [-1, 11]]
    with pytest.raises(PlacementError):
        p.physical_ids(2, ids)
    with pytest.raises(PlacementError):
        p.physical_ids(0, ids.reshape(-1))
