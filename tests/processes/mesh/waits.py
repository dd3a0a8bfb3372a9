"""Waiting for a mesh's state under a deadline, instead of sleeping a fixed time and hoping it was enough, and
reading the state it waits on."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from typing import TypeVar

from tests.processes.mesh.launch import RunningMesh

T = TypeVar("T")


def until(probe: Callable[[], T], done: Callable[[T], bool], deadline_s: float, what: str,
          poll_s: float = 0.05) -> T:
    """Call `probe` until `done(result)`; AssertionError naming `what` and the last result at the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        result = probe()
        if done(result):
            return result
        assert time.monotonic() < end, f"{what} not within {deadline_s:g} s; last seen: {result}"
        time.sleep(poll_s)


def assert_processes_gone(mesh: RunningMesh, deadline_s: float = 15) -> None:
    """After `mesh.stop()`: every service process has exited (they may take a moment to be reaped)."""
    until(mesh.alive_pids, lambda alive: alive == [], deadline_s, "moemesh up's services gone")


def migrations(mesh: RunningMesh) -> float:
    """The gateway's `moemesh_request_migrations_total`, read from its /metrics."""
    body = urllib.request.urlopen(f"http://{mesh.metrics['gateway']}/metrics", timeout=5).read().decode()
    values = [float(line.split()[1]) for line in body.splitlines()
              if line.startswith("moemesh_request_migrations_total ")]
    assert len(values) == 1, body
    return values[0]
