"""Running a test file as the rank script of a gloo group: one process per rank, logs kept, a bounded wait."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.paths import ROOT


def run_ranks(script: str, world: int, args_of: Callable[[int], list[str]], out: Path, timeout_s: float) -> None:
    """`python SCRIPT *args_of(rank)` for every rank at once; fails the test with the failed ranks' log tails
    when any exits non-zero or the group outlives `timeout_s` (then every rank is killed)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    procs, logs = [], []
    for rank in range(world):
        log = open(out / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, script, *args_of(rank)], cwd=ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        tails = "\n".join(f"--- rank {r} (rc {rc})\n" + (out / f"rank{r}.log").read_text()[-3000:] for r, rc in failed)
        pytest.fail(f"EP ranks failed or timed out after {timeout_s}s:\n{tails}")
