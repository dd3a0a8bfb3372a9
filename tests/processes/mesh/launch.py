"""Starting the real mesh (`moemesh up`) for process tests and stopping it: `moemesh.service.launch.start_mesh`,
seen the way the tests read it (name -> (address, pid), with "NAME-http" entries for REST APIs)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from moemesh.service.launch import MeshProcess
from moemesh.service.launch import start_mesh as launch_mesh
from tests.paths import ROOT

__all__ = ["ROOT", "RunningMesh", "start_mesh"]


@dataclass
class RunningMesh:
    mesh: MeshProcess
    services: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (address, pid)
    metrics: dict[str, str] = field(default_factory=dict)  # name -> address of its Prometheus /metrics

    @property
    def proc(self) -> subprocess.Popen:
        """The `moemesh up` process."""
        return self.mesh.proc

    @property
    def output(self) -> list[str]:
        """Every line `moemesh up` and its services wrote (stdout and stderr), so far."""
        return self.mesh.output.lines

    @property
    def gateway(self) -> str:
        return self.services["gateway"][0]

    def stop(self, timeout_s: float = 30) -> None:
        self.mesh.stop(timeout_s)

    def alive_pids(self) -> list[int]:
        """The pids of `services` (one per entry) still running."""
        alive = set(self.mesh.alive_pids())
        return [pid for _, pid in self.services.values() if pid in alive]


def start_mesh(*args: str, timeout_s: float = 240, env: dict[str, str] | None = None) -> RunningMesh:
    """Run `moemesh up ARGS` (gRPC and REST on free ports) and wait until every service is ready; `env` adds
    to this process's environment."""
    mesh = launch_mesh(args, timeout_s=timeout_s, env={**os.environ, **(env or {})}, cwd=ROOT)
    running = RunningMesh(mesh)
    for r in mesh.services.values():
        running.services[r.name] = (r.address, r.pid)
        if r.http_address:
            running.services[f"{r.name}-http"] = (r.http_address, r.pid)
        if r.metrics_address:
            running.metrics[r.name] = r.metrics_address
    return running


@contextlib.contextmanager
def running_mesh(*args: str) -> Iterator[RunningMesh]:
    """`start_mesh(*args)` for the length of a `with` block (a module fixture's body), stopped however it ends."""
    running = start_mesh(*args)
    try:
        yield running
    finally:
        running.stop()


@contextlib.contextmanager
def openai_client(mesh: RunningMesh) -> Iterator[Any]:
    """The `openai` client on the mesh's REST port (it needs `--http-port`); no proxy, no retries."""
    import httpx
    import openai

    with httpx.Client(trust_env=False) as http:  # loopback: no proxy from the environment
        yield openai.OpenAI(base_url=f"http://{mesh.services['gateway-http'][0]}/v1", api_key="unused",
                            http_client=http, max_retries=0, timeout=120)
