"""Readiness lines ("NAME listening on ADDR") from processes sharing one stdout pipe, as an EP group's ranks
share their launcher's, stay whole lines even with unbuffered output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from tests.paths import ROOT

LINES = 2000
WRITER = f"""
import sys, time
from moemesh.service.server import announce
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # both processes write at the same moment
for i in range({LINES}):
    announce(f"decode listening on 127.0.0.1:{{sys.argv[1]}}{{i:05d}}")
"""


def test_concurrent_announcements_never_interleave() -> None:
    read, write = os.pipe()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the setting under which print() splits a line in two
    start = str(time.time() + 1.5)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(rank), start], cwd=ROOT, stdout=write, env=env)
             for rank in range(2)]
    os.close(write)
    with os.fdopen(read) as out:
        lines = out.read().splitlines()
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert len(lines) == 2 * LINES
    assert all(re.fullmatch(r"decode listening on 127\.0\.0\.1:[01]\d{5}", line) for line in lines), \
        [line for line in lines if not re.fullmatch(r"decode listening on \S+", line)][:3]
