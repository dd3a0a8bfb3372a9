"""`moemesh bench profile` runs one engine's steps and prints the times, the limits and both profiles."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

from moemesh.model.tiny import make_tiny
from tests.paths import ROOT


def test_bench_profile_reports_steps_limits_and_profiles(tmp_path: Path) -> None:
    model = make_tiny(tmp_path / "bf16", seed=0, dtype=torch.bfloat16)
    proc = subprocess.run(
        [sys.executable, "-m", "moemesh.services.cli.main", "bench", "profile", "--model", str(model), "--batch", "2",
         "--prompt-len", "16", "--steps", "2", "--num-threads", "1", "--top", "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "compute dtype bfloat16" in out
    assert re.search(r"read bandwidth [\d.]+ GB/s; matmul \d+ GFLOP/s fp32, \d+ GFLOP/s bf16", out)
    read = re.search(r"decode step, batch 2: [\d.]+ ms; weights read ([\d.]+) MB \(([\d.]+) MB dense \+ ([\d.]+) MB",
                     out)
    assert read, out
    total, dense, experts = map(float, read.groups())
    assert abs(total - dense - experts) <= 0.2 and dense > 0 and experts > 0
    assert re.search(r"prefill step, 2 x 16: [\d.]+ ms, [\d.]+ GFLOP of matrix work", out)
    assert "5 decode steps at batch 2:" in out and "one prefill step of 2 x 16:" in out
