"""Starting the real mesh (`moemesh up`) for integration tests, and stopping it without leftovers."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_ROW = re.compile(r"^\s+(\S+)\s+(\S+:\d+)\s+(\d+)$")


@dataclass
class RunningMesh:
    proc: subprocess.Popen
    services: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (address, pid)
    output: list[str] = field(default_factory=list)

    @property
    def gateway(self) -> str:
        return self.services["gateway"][0]

    def stop(self, timeout_s: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def alive_pids(self) -> list[int]:
        alive = []
        for _, pid in self.services.values():
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        return alive


def start_mesh(*args: str, timeout_s: float = 240, env: dict[str, str] | None = None) -> RunningMesh:
    """Run `moemesh up ARGS` and wait until it prints its table of services."""
    cmd = [sys.executable, "-m", "services.cli.main", "up", "--grpc-port", "0", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    mesh = RunningMesh(proc)
    deadline = time.monotonic() + timeout_s
    fd = proc.stdout.fileno()
    in_table = False
    while True:
        if proc.poll() is not None:
            rest = proc.stdout.read()
            raise RuntimeError(f"moemesh up exited with {proc.returncode}:\n" + "\n".join(mesh.output) + rest)
        if time.monotonic() > deadline:
            mesh.stop()
            raise TimeoutError("moemesh up not ready in time:\n" + "\n".join(mesh.output))
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        line = proc.stdout.readline().rstrip()
        mesh.output.append(line)
        if line.startswith("moemesh is up"):
            in_table = True
        elif in_table:
            m = _ROW.match(line)
            if m:
                mesh.services[m.group(1)] = (m.group(2), int(m.group(3)))
            elif line.startswith("Ctrl-C"):
                # Keep draining: the services' logs share this pipe and would block once it filled.
                threading.Thread(target=_drain, args=(mesh,), daemon=True).start()
                return mesh


def _drain(mesh: RunningMesh) -> None:
    for line in mesh.proc.stdout:
        mesh.output.append(line.rstrip())
