"""Starting the real mesh (`moemesh up`) for integration tests, and stopping it without leftovers."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from tests.paths import ROOT

_ROW = re.compile(r"^\s+(\S+)\s+(\S+:\d+)\s+(\d+)$")


@dataclass
class RunningMesh:
    proc: subprocess.Popen
    services: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (address, pid)
    metrics: dict[str, str] = field(default_factory=dict)  # name -> address of its Prometheus /metrics
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
    """Run `moemesh up ARGS` (gRPC and REST on free ports) and wait until it prints its table of services."""
    cmd = [sys.executable, "-m", "moemesh.services.cli.main", "up", "--grpc-port", "0", "--http-port", "0", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    mesh = RunningMesh(proc)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        # A thread, not select(): readline() reads ahead, and the pipe must be drained for good anyway
        # (the services' logs share it and would block once it filled).
        for line in proc.stdout:
            mesh.output.append(line.rstrip())
            lines.put(line.rstrip())
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    in_table = False
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            mesh.stop()
            raise TimeoutError("moemesh up not ready in time:\n" + "\n".join(mesh.output)) from None
        if line is None:
            raise RuntimeError(f"moemesh up exited with {proc.wait()}:\n" + "\n".join(mesh.output))
        if line.startswith("moemesh is up"):
            in_table = True
        elif in_table:
            m = _ROW.match(line)
            if m and m.group(1).endswith("-metrics"):
                mesh.metrics[m.group(1).removesuffix("-metrics")] = m.group(2)
            elif m:
                mesh.services[m.group(1)] = (m.group(2), int(m.group(3)))
            elif line.startswith("Ctrl-C"):
                return mesh
