"""The three kinds of test, by folder, each a pytest marker: what a test needs decides where it lives.

- tests/unit/: in-process code only, no server and no child process;
- tests/service/: real gRPC or HTTP servers on loopback inside the test's own process;
- tests/processes/: child processes (`moemesh up`, `moemesh serve`, EP rank groups, pip, validators).

`pytest -m "not processes"` is the fast loop. The guards below make the folders honest: a unit test that opens
a listening socket or a gRPC server, or a unit or service test that starts a process, fails with a message saying
where it belongs instead of passing in the wrong kind.
"""

from __future__ import annotations

import multiprocessing.process
import socket
import subprocess
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

KINDS = ("unit", "service", "processes")
_TESTS = Path(__file__).resolve().parent


def kind_of(path: Path) -> str:
    """The kind of the test file at `path`: the name of its folder under tests/."""
    rel = Path(path).resolve().relative_to(_TESTS)
    if rel.parts[0] not in KINDS:
        raise pytest.UsageError(f"{rel}: tests live under one of tests/{{{','.join(KINDS)}}}/")
    return rel.parts[0]


def _refuse(what: str, kind: str, belongs: str) -> Any:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a {kind} test {what}: it belongs in tests/{belongs}/")

    return refused


def guard(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make starting what `kind` may not start fail loudly for the current test."""
    if kind == "processes":
        return
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("started a process", kind, "processes"))
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start",
                        _refuse("started a process", kind, "processes"))
    if kind == "unit":
        monkeypatch.setattr(socket.socket, "listen", _refuse("listened on a socket", kind, "service"))
        monkeypatch.setattr(grpc, "server", _refuse("made a gRPC server", kind, "service"))
        monkeypatch.setattr(grpc.aio, "server", _refuse("made a gRPC server", kind, "service"))
