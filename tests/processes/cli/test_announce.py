"""Readiness lines ("NAME listening on ADDR") from processes sharing one stdout pipe, as an EP group's ranks
share their launcher's, stay whole lines even with unbuffered output."""

from __future__ import annotations

import os
import subprocess
import sys
from itertools import pairwise

from moemesh.telemetry.readiness import GRPC, Ready, parse_line
from tests.paths import ROOT

LINES = 2000
# Each writer says it is ready on stderr, then waits for its stdin to close: both start writing at once.
WRITER = f"""
import sys
from moemesh.service.server import announce
sys.stderr.write("ready\\n")
sys.stderr.flush()
sys.stdin.read()
for i in range({LINES}):
    announce("decode", f"127.0.0.1:{{sys.argv[1]}}{{i:05d}}")
"""
# Scheduling may still run one writer to its end before the other starts (nothing to test then): try again.
ATTEMPTS = 5


def _write_together() -> list[str]:
    """The lines two writers sharing one stdout pipe wrote, started together, in the order the pipe got them."""
    read, write = os.pipe()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the setting under which print() splits a line in two
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(rank)], cwd=ROOT, stdout=write, env=env,
                              stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    os.close(write)
    try:
        for p in procs:  # the barrier: both imported and waiting
            assert p.stderr.readline() == "ready\n", p.stderr.read()
        for p in procs:
            p.stdin.close()
        with os.fdopen(read) as out:
            lines = out.read().splitlines()
        assert [p.wait(timeout=60) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stderr.close()
    return lines


def test_concurrent_announcements_never_interleave() -> None:
    expected = {Ready("decode", GRPC, f"127.0.0.1:{rank}{i:05d}") for rank in range(2) for i in range(LINES)}
    switches = []
    for _ in range(ATTEMPTS):
        lines = _write_together()
        assert len(lines) == 2 * LINES
        assert [line for line in lines if parse_line(line) is None][:3] == []
        # Every line whole: each address announced arrives once, intact.
        ready = [parse_line(line) for line in lines]
        assert sorted(ready, key=repr) == sorted(expected, key=repr)
        # The writers overlapped when the pipe got one's lines, then the other's, then the first's again.
        ranks = [r.address.rsplit(":", 1)[1][0] for r in ready]
        switches.append(sum(a != b for a, b in pairwise(ranks)))
        if switches[-1] >= 2:
            break
    assert switches[-1] >= 2, f"the two writers never wrote at the same time ({switches} switches between them)"
