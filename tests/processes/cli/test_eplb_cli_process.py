"""`moemesh eplb rebalance` and `moemesh eplb simulate`: output, files, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.paths import ROOT
from tests.unit.eplb.test_eplb_cli import TOPOLOGY


def test_parser_does_not_import_torch() -> None:
    code = ("import argparse, sys; from moemesh.services.cli import eplb_cmd; "
            "eplb_cmd.add_parser(argparse.ArgumentParser().add_subparsers()); print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.stdout.strip() == "False", r.stderr


def test_a_real_process_exits_2_without_traceback(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "moemesh.services.cli.eplb_cmd", "eplb", "rebalance", "--weights",
                        str(tmp_path / "nope.json"), "--num-physical", "16", *TOPOLOGY],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("moemesh: error: cannot read weights file")
