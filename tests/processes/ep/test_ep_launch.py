"""`moemesh serve decode --ep-size K`: option checks, and the launcher starting a node's rank processes."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.telemetry.readiness import GRPC, parse_line
from tests.paths import ROOT


@pytest.mark.parametrize(("argv", "message"), [
    (["--ep-size", "0"], "--ep-size must be >= 1"),
    (["--ep-size", "4", "--nnodes", "3", "--dist-init-addr", "h:1"], "multiple of --nnodes"),
    (["--ep-size", "4", "--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "h:1"], "--node-rank must be in"),
    (["--ep-size", "4", "--nnodes", "2"], "--dist-init-addr"),
    (["--ep-size", "2", "--ep-rank", "2"], "--ep-rank must be in"),
    (["--redundant-experts", "-1"], "--redundant-experts must be >= 0"),
])
def test_bad_group_options_are_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    from moemesh.services.decode.serve import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_launcher_starts_the_ranks_and_stops_them(small_dir: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "moemesh.services.cli.main", "serve", "decode", "--ep-size", "2", "--port", "0",
           "--metrics-port", "0", "--gateway", "", "--model", str(small_dir), "--kv-cache-mb", "16"]
    stderr = open(tmp_path / "stderr.log", "w")  # the ranks' logs, shown if they do not come up
    # Its own process group, so that a failure kills the ranks too (killing the launcher alone orphans them).
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line.strip())
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    addresses: list[str] = []
    try:
        deadline = time.monotonic() + 180  # two model loads on a loaded 2-core CI machine
        while len(addresses) < 2:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("the ranks did not come up in time:\n" + (tmp_path / "stderr.log").read_text()[-4000:])
            assert line is not None, "the launcher exited before both ranks were listening:\n" + \
                (tmp_path / "stderr.log").read_text()[-4000:]
            ready = parse_line(line)
            if ready is not None and (ready.service, ready.kind) == ("decode", GRPC):
                addresses.append(ready.address)
        assert len(set(addresses)) == 2  # a gRPC endpoint per DP rank
        for addr in addresses:
            with grpc.insecure_channel(addr) as ch:
                status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
                assert status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)  # passed on to both ranks, which leave the group together
        assert proc.wait(timeout=60) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank still running
        proc.wait()
        stderr.close()
