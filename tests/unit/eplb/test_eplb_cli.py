"""`moemesh eplb rebalance` and `moemesh eplb simulate`: output, files, and one-line errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moemesh.ep.placement import ExpertPlacement
from moemesh.services.cli.eplb_cmd import main
from moemesh.telemetry.expert_load_file import append_window

EXAMPLE_WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                  [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
EXAMPLE_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                   [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
TOPOLOGY = ["--num-groups", "4", "--num-nodes", "2", "--num-ranks", "8"]


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "weights.json"
    path.write_text(json.dumps({"weight": EXAMPLE_WEIGHT}))
    return path


@pytest.fixture
def stats(tmp_path: Path) -> Path:
    """A decode group of 2 ranks recording 8 windows of a skewed load over 2 layers x 16 experts."""
    path = tmp_path / "load.jsonl"
    g = torch.Generator().manual_seed(0)
    popularity = 1.0 / torch.arange(1, 17, dtype=torch.float64).repeat(2, 1)
    for step in range(8):
        for rank in range(2):
            ids = torch.multinomial(popularity, 2000, replacement=True, generator=g)
            counts = torch.zeros(2, 16, dtype=torch.int64).scatter_add_(1, ids, torch.ones_like(ids))
            append_window(path, counts, role="decode", instance_id="decode-0", rank=rank, t=1000.0 + step)
    return path


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(["eplb", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_rebalance_prints_the_placement(capsys: pytest.CaptureFixture, weights: Path) -> None:
    code, out, err = run(capsys, "rebalance", "--weights", str(weights), "--num-physical", "16", *TOPOLOGY,
                         "--policy", "auto")  # DeepSeek's, whose published example this is
    assert code == 0, err
    assert out.startswith("hierarchical policy: 2 MoE layers, 12 logical experts -> 16 slots on 8 ranks")
    assert f"phy2log {EXAMPLE_PHY2LOG[0]}" in out and f"phy2log {EXAMPLE_PHY2LOG[1]}" in out
    assert "log2phy [[12, -1], [13, 15]," in out and "logcnt  [1, 2, 1, 1, 2, 2," in out
    assert "    0   0.480   0.828" in out  # balancedness before (trivial) and after, layer 0


def test_rebalance_json_and_out_file(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(EXAMPLE_WEIGHT))  # a bare [[...]] list works too
    out_file = tmp_path / "placement.json"
    code, out, err = run(capsys, "rebalance", "--weights", str(bare), "--num-physical", "16", *TOPOLOGY,
                         "--policy", "auto", "--out", str(out_file), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["policy"] == "hierarchical" and doc["phy2log"] == EXAMPLE_PHY2LOG
    assert doc["logcnt"][0] == [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1] and doc["log2phy"][0][1] == [13, 15]
    before, after = doc["balancedness"]["before"], doc["balancedness"]["after"]
    assert all(a > b for a, b in zip(after, before, strict=True))
    placement = ExpertPlacement.from_file(out_file, num_logical=12)
    assert placement.ep_size == 8 and placement.phy2log.tolist() == EXAMPLE_PHY2LOG


def test_rebalance_defaults_to_the_refined_policy(capsys: pytest.CaptureFixture, weights: Path) -> None:
    docs = {}
    for policy in ("auto", None):
        extra = ("--policy", policy) if policy else ()
        code, out, err = run(capsys, "rebalance", "--weights", str(weights), "--num-physical", "16", *TOPOLOGY,
                             *extra, "--json")
        assert code == 0, err
        docs[policy] = json.loads(out)
    assert docs[None]["policy"] == "refined-hierarchical"
    assert all(r >= a for r, a in zip(docs[None]["balancedness"]["after"], docs["auto"]["balancedness"]["after"],
                                      strict=True))


def hand_balancedness(weight: list[int], phy2log: list[int], num_ranks: int) -> float:
    """Mean over max per-rank load of one layer: a replicated expert's load splits evenly over its slots, and
    rank r holds the r-th run of len(phy2log) / num_ranks slots."""
    per_rank = len(phy2log) // num_ranks
    loads = [sum(weight[e] / phy2log.count(e) for e in phy2log[r * per_rank:(r + 1) * per_rank])
             for r in range(num_ranks)]
    return sum(loads) / num_ranks / max(loads)


def test_rebalance_with_previous_reports_moves(capsys: pytest.CaptureFixture, weights: Path, tmp_path: Path) -> None:
    previous = tmp_path / "previous.json"
    assert run(capsys, "rebalance", "--weights", str(weights), "--num-physical", "16", *TOPOLOGY,
               "--out", str(previous))[0] == 0
    # the same load and policy again: nothing moves
    code, out, err = run(capsys, "rebalance", "--weights", str(weights), "--num-physical", "16", *TOPOLOGY,
                         "--previous", str(previous), "--json")
    assert code == 0, err
    assert json.loads(out)["moved_slots"] == {"before": [0, 0], "after": [0, 0]}
    # another policy: strictly fewer moves than the plain answer, same balance
    code, out, err = run(capsys, "rebalance", "--weights", str(weights), "--num-physical", "16", *TOPOLOGY,
                         "--policy", "global", "--previous", str(previous), "--tolerance", "0", "--json")
    assert code == 0, err
    doc = json.loads(out)
    moved = doc["moved_slots"]
    assert all(a < b for a, b in zip(moved["after"], moved["before"], strict=True))
    code, out, err = run(capsys, "rebalance", "--weights", str(weights), "--num-physical", "16", *TOPOLOGY,
                         "--policy", "global", "--json")
    assert code == 0, err
    plain = json.loads(out)
    assert doc["balancedness"]["after"] == pytest.approx(plain["balancedness"]["after"])
    # ...and the balance reported is that of the placement printed, counted by hand.
    assert doc["balancedness"]["after"] == pytest.approx(
        [hand_balancedness(w, p, 8) for w, p in zip(EXAMPLE_WEIGHT, doc["phy2log"], strict=True)])
    assert all(a > b for a, b in zip(doc["balancedness"]["after"], doc["balancedness"]["before"], strict=True))
    code, out, _ = run(capsys, "rebalance", "--weights", str(weights), "--num-physical", "16", *TOPOLOGY,
                       "--policy", "global", "--previous", str(previous))
    assert "previous  moved minimised" in out and "(previous kept)" not in out


def test_simulate_prints_a_table_and_draws(capsys: pytest.CaptureFixture, stats: Path, tmp_path: Path) -> None:
    png = tmp_path / "sim.png"
    code, out, err = run(capsys, "simulate", "--stats", str(stats), "--num-ranks", "8", "--num-groups", "4",
                         "--num-nodes", "1", "--redundant", "0,8,16", "--png", str(png))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("8 history + 8 future windows, 2 MoE layers x 16 experts; refined-hierarchical "
                               "policy")
    assert lines[2].split() == ["redundant", "slots", "trivial", "rebalanced", "oracle"]
    assert [line.split()[:2] for line in lines[3:6]] == [["0", "16"], ["8", "24"], ["16", "32"]]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code, out, err = run(capsys, "simulate", "--stats", str(stats), "--num-ranks", "8", "--num-groups", "4",
                         "--num-nodes", "1", "--redundant", "0,8", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert [row["redundant"] for row in doc["rows"]] == [0, 8]
    assert doc["rows"][1]["rebalanced"] > doc["rows"][1]["trivial"]
    assert len(doc["rows"][0]["layers"]["oracle"]) == 2


@pytest.mark.parametrize(("argv", "message"), [
    (["rebalance", "--weights", "{missing}", "--num-physical", "16", *TOPOLOGY], "cannot read weights file"),
    (["rebalance", "--weights", "{weights}", "--num-physical", "18", *TOPOLOGY], "not divisible by num_ranks"),
    (["rebalance", "--weights", "{weights}", "--num-physical", "8", *TOPOLOGY], "cannot hold the 12"),
    (["rebalance", "--weights", "{weights}", "--num-physical", "16", "--num-groups", "5", "--num-nodes", "1",
      "--num-ranks", "8"], "does not divide the 12"),
    (["rebalance", "--weights", "{ragged}", "--num-physical", "16", *TOPOLOGY], "rows differ in length"),
    (["rebalance", "--weights", "{weights}", "--num-physical", "16", *TOPOLOGY, "--previous", "{ragged}"],
     "placement file"),
    (["simulate", "--stats", "{missing}", *TOPOLOGY], "cannot read stats file"),
    (["simulate", "--stats", "{ragged}", *TOPOLOGY], ":1: expected a JSON object"),
    (["simulate", "--stats", "{stats}", *TOPOLOGY, "--redundant", "4"], "not divisible by num_ranks"),
    (["simulate", "--stats", "{stats}", *TOPOLOGY, "--redundant", "0,x"], "comma-separated ints"),
    (["simulate", "--stats", "{stats}", *TOPOLOGY, "--role", "prefill"], "no windows with role 'prefill'"),
])
def test_bad_input_is_one_line_and_exit_2(capsys: pytest.CaptureFixture, tmp_path: Path, weights: Path, stats: Path,
                                          argv: list[str], message: str) -> None:
    ragged = tmp_path / "ragged.json"
    ragged.write_text("[[1, 2], [3]]")
    paths = {"missing": tmp_path / "nope.json", "weights": weights, "ragged": ragged, "stats": stats}
    code, out, err = run(capsys, *(a.format(**paths) for a in argv))
    assert code == 2 and out == ""
    assert err.startswith("moemesh: error: ") and message in err and err.count("\n") == 1


def test_missing_option_is_a_usage_error(capsys: pytest.CaptureFixture, weights: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["eplb", "rebalance", "--weights", str(weights), "--num-physical", "16"])
    assert info.value.code == 2 and "--num-ranks" in capsys.readouterr().err


