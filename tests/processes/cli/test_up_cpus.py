"""Where `moemesh up` runs its processes on a CPU host: each decode worker on cores of its own (kvtransfer beside a
one-thread one), every other service on the rest, the engines' threads sized to their cores; `--pin off` leaves
placement to the OS."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest

from moemesh.service import cpus
from moemesh.services.cli import up
from moemesh.services.cli.detach import alive, read_pid
from moemesh.telemetry.readiness import read_ready_file
from tests.processes.cli.test_detach import moemesh, stopped_after
from tests.processes.mesh.waits import until

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this OS")


def _engine_nice(pid: int) -> int | None:
    """The niceness of the process's thread named "engine" (field 19 of its stat), None when it has none."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "comm").read_text().strip() == "engine":
            return int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])
    return None


def _placement(tmp_path: Path, tiny_dir: Path, *extra: str) -> dict[str, tuple[set[int], list[str], int | None]]:
    """Start a detached mesh on the first two cores this test may use; each service's cores, command line and the
    niceness of its engine thread (None: a service without an engine)."""
    cores = sorted(os.sched_getaffinity(0))[:2]
    pid_file = tmp_path / "mesh.pid"
    env = {**os.environ, cpus.ENV: cpus.format_cpus(cores)}
    with stopped_after(pid_file):
        r = moemesh("up", "--detach", "--model", str(tiny_dir), "--grpc-port", "0", "--http-port", "0",
                    "--pid-file", str(pid_file), *extra, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        records = {s.name: s for s in read_ready_file(tmp_path / "mesh.ready.json")}
        out = {name: (os.sched_getaffinity(s.pid), Path(f"/proc/{s.pid}/cmdline").read_text().split("\0"),
                      _engine_nice(s.pid)) for name, s in records.items()}
        # The mesh serves as placed.
        body = json.dumps({"prompt": "hello", "max_tokens": 3}).encode()
        req = urllib.request.Request(f"http://{records['gateway'].http_address}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert json.loads(resp.read())["usage"]["completion_tokens"] == 3
        pid = read_pid(pid_file)
        assert moemesh("down", "--pid-file", str(pid_file)).returncode == 0
    until(lambda: [p for p in {s.pid for s in records.values()} | {pid} if alive(p)], lambda left: left == [], 15,
          "the mesh's processes gone")
    return out


def _threads(cmdline: list[str]) -> str | None:
    return cmdline[cmdline.index("--num-threads") + 1] if "--num-threads" in cmdline else None


def test_decode_workers_run_alone_on_their_cores(tmp_path: Path, tiny_dir: Path) -> None:
    cores = sorted(os.sched_getaffinity(0))[:2]
    placed = _placement(tmp_path, tiny_dir)
    assert set(placed) == {"kvtransfer", "eplb", "gateway", "prefill-0", "decode-0"}
    for name, (_, cmdline, _) in placed.items():
        if name.startswith(("prefill", "decode")):  # two engines share the host's cores: one thread's worth each
            assert cmdline[cmdline.index("--procs-per-host") + 1] == "2", cmdline
        # A prefill worker lets a burst of requests gather for one step; a decode worker starts at once.
        waits = cmdline[cmdline.index("--batch-wait-ms") + 1] if "--batch-wait-ms" in cmdline else None
        assert waits == (str(up.PREFILL_BATCH_WAIT_MS) if name.startswith("prefill") else None), (name, cmdline)
    if len(cores) < 2:  # one core: nothing left for the others, so nothing is pinned
        assert all(c == set(cores) for c, _, _ in placed.values()), placed
        return
    decode, shared = {cores[1]}, {cores[0]}
    assert placed["decode-0"][0] == placed["kvtransfer"][0] == decode  # kvtransfer beside a one-thread decode worker
    assert all(placed[n][0] == shared for n in ("eplb", "gateway", "prefill-0")), placed
    assert _threads(placed["decode-0"][1]) == _threads(placed["prefill-0"][1]) == "1"
    # The prefill worker's engine thread yields the shared core to the services; the decode worker's keeps its own.
    assert (placed["prefill-0"][2], placed["decode-0"][2]) == (cpus.SHARED_ENGINE_NICE, 0)
    # Without TLS the KV goes straight from the prefill worker to the decode worker's socket.
    for worker in ("prefill-0", "decode-0"):
        cmdline = placed[worker][1]
        assert cmdline[cmdline.index("--transfer") + 1] == "tcp", cmdline


def test_pin_off_leaves_every_process_on_every_core(tmp_path: Path, tiny_dir: Path) -> None:
    cores = set(sorted(os.sched_getaffinity(0))[:2])
    placed = _placement(tmp_path, tiny_dir, "--pin", "off")
    assert all(c == cores for c, _, _ in placed.values()), placed
    assert _threads(placed["decode-0"][1]) is None  # the workers size their own threads
    assert placed["prefill-0"][2] == placed["decode-0"][2] == 0  # no core shared by design: no engine yields
