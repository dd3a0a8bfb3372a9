"""`moemesh bench ep` and `bench eplb` run their EP groups end to end and report every table (tiny sizes:
smoke runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.paths import ROOT


def test_bench_ep_reports_every_comparison(tmp_path: Path) -> None:
    out = tmp_path / "ep.json"
    proc = subprocess.run(
        [sys.executable, "-m", "moemesh.services.cli.main", "bench", "ep", "--preset", "tiny", "--ep-sizes", "1,2",
         "--moe-tokens", "0,8", "--batch-sizes", "2", "--decode-steps", "2", "--repeats", "2", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for title in ("one MoE layer", "decode step", "dispatch+combine", "two-batch overlap"):
        assert title in proc.stdout
    results = json.loads(out.read_text())
    assert set(results) == {"1", "2"}
    assert results["2"]["decode_tok_s"]["2"] > 0 and results["2"]["tbo"]["2"] > 0
    # Eight tokens per rank over two ranks move hidden states both ways; zero tokens move nothing.
    assert results["2"]["comm"]["8"]["bytes"] > 0
    assert results["2"]["comm"]["0"]["bytes"] == 0


def test_bench_eplb_rebalances_the_skewed_group(tmp_path: Path) -> None:
    out = tmp_path / "eplb.json"
    proc = subprocess.run(
        [sys.executable, "-m", "moemesh.services.cli.main", "bench", "eplb", "--preset", "tiny", "--ep-sizes", "2",
         "--batch-sizes", "4", "--decode-steps", "2", "--switches", "3", "--load-steps", "40", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())["2"]
    # The skew shows under the start-up placement, and the new placement spreads it.
    assert r["balancedness_before"] < 0.9 < r["balancedness_after"]
    assert r["moved_slots"] > 0 and r["pause_s"] > 0
    assert "switch pause" in proc.stdout
    # Three switches back and forth, each against its own run without one; the first and third start from the
    # same placement, so their runs without a switch give the A/A figure.
    load = r["load"]
    assert [t["rounds"] > 0 for t in load["per_switch"]] == [True] * 3 and len(load["aa_p99_ratios"]) == 1
    assert load["switch_steps"] == sum(t["steps"] for t in load["per_switch"]) > 0
    assert "p99 ITL of each switch" in proc.stdout
