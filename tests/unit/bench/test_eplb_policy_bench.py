"""`moemesh bench eplb-policy` (`moemesh.bench.eplb_policy`) on small shapes: its loads, its comparison, its report."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from moemesh.bench.eplb_policy import compare, synthetic_loads
from moemesh.services.cli.main import main

FIXTURE = Path(__file__).parents[1] / "eplb" / "data" / "tiny_mesh_expert_load.jsonl"


def test_synthetic_loads_are_skewed_and_drift() -> None:
    weight = synthetic_loads(6, 64, seed=0, zipf=0.8, hot=2, hot_factor=3.0, drift=0.3, tokens=10000)
    assert weight.shape == (6, 64) and weight.dtype == torch.float64 and (weight >= 0).all()
    assert torch.allclose(weight.sum(1), torch.full((6,), 10000.0, dtype=torch.float64), rtol=0.01)
    assert (weight.amax(1) > 5 * weight.mean(1)).all()  # a few experts take much more than their share
    top = weight.argsort(1, descending=True)[:, :8].tolist()
    assert any(set(a) != set(b) for a, b in itertools.pairwise(top))  # the favourites change by layer
    assert torch.equal(weight, synthetic_loads(6, 64, seed=0, zipf=0.8, hot=2, hot_factor=3.0, drift=0.3,
                                               tokens=10000))


def test_compare_reports_both_policies() -> None:
    weight = synthetic_loads(4, 64, seed=1)
    row = compare(weight, 72, 8, 1, 18, repeats=1)
    assert set(row["policies"]) == {"auto", "refined"}
    assert row["policies"]["refined"]["resolved"] == "refined-hierarchical"
    assert row["worse_layers"] == 0 and row["min_layer_gain"] >= 0 and row["layers"] == 4
    assert row["gain"] == pytest.approx(row["policies"]["refined"]["mean"] - row["policies"]["auto"]["mean"])


def test_the_command_prints_and_writes_json(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    out_json = tmp_path / "r.json"
    assert main(["bench", "eplb-policy", "--layers", "2", "--seeds", "1", "--repeats", "1", "--stats", str(FIXTURE),
                 "--stats-groups", "4", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "(a) synthetic: 2 MoE layers x 256 experts + 32 redundant" in out and "decode-like EP 72" in out
    assert "(b) recorded:" in out and "13 windows" in out
    doc = json.loads(out_json.read_text())
    assert len(doc["synthetic"]) == 2 and len(doc["recorded"]) == 2
    assert all(r["worse_layers"] == 0 for r in doc["synthetic"] + doc["recorded"])
