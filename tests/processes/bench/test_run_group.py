"""`run_group` (the rank launcher of `moemesh bench ep|eplb`) never waits for ever: a rank that fails ends the group
at once, naming it, and a group past its deadline is killed. The ranks here are stand-ins (a module written to a
temporary folder) that fail or hang on purpose, as a real rank does when its peer never reaches the rendezvous."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from moemesh.bench.ep import run_group

# Rank script: argv is RANK SIZE ADDR CKPT OUT OPTIONS_JSON, as run_group passes it.
RANK = """
import json, sys, time
rank, out, options = int(sys.argv[1]), sys.argv[5], json.loads(sys.argv[6])
what = options["ranks"][rank]
if what == "fail":
    sys.exit(3)
if what == "hang":
    time.sleep(600)
if rank == 0:
    open(out, "w").write(json.dumps({"rank": rank}))
"""


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "fake_rank.py").write_text(RANK)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the ranks inherit this process's environment
    return "fake_rank"


def test_a_healthy_group_gives_rank_zeros_result(module: str, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    assert run_group(module, 2, tmp_path, out, {"ranks": ["ok", "ok"]}, timeout_s=60) == {"rank": 0}


def test_a_failed_rank_ends_the_group_at_once(module: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    t0 = time.monotonic()
    result = run_group(module, 2, tmp_path, tmp_path / "out.json", {"ranks": ["fail", "hang"]}, timeout_s=300)
    assert result is None
    assert time.monotonic() - t0 < 60  # not the deadline: the failure ended it
    err = capsys.readouterr().err
    assert "rank 0 exited with code 3" in err and "killed ranks [1]" in err


def test_a_group_past_its_deadline_is_killed(module: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    t0 = time.monotonic()
    assert run_group(module, 2, tmp_path, tmp_path / "out.json", {"ranks": ["hang", "hang"]}, timeout_s=2) is None
    assert 2 <= time.monotonic() - t0 < 60
    err = capsys.readouterr().err
    assert "not done after 2 s (ranks [0, 1] still running)" in err and "killed ranks [0, 1]" in err


def test_options_reach_the_ranks_as_json(module: str, tmp_path: Path) -> None:
    # Rank 1 failing after rank 0 wrote its result still fails the group: a result needs every rank.
    out = tmp_path / "out.json"
    assert run_group(module, 2, tmp_path, out, {"ranks": ["ok", "fail"]}, timeout_s=60) is None
    assert json.loads(out.read_text()) == {"rank": 0}
