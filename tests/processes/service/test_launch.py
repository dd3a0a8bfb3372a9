"""The launcher (`moemesh.service.launch`) with real child processes: output drained so a chatty child never
blocks, readiness only from whole lines, deadlines, failures reported with the child's output, bounded stops;
then a real `moemesh serve` and a real `moemesh up` through it."""

from __future__ import annotations

import signal
import sys
import time

import pytest

from moemesh.service.launch import launch, start_mesh, start_service
from moemesh.telemetry.readiness import GRPC, METRICS, read_ready_file
from tests.paths import ROOT


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_chatty_child_never_blocks_and_its_readiness_is_found() -> None:
    # 4 MiB of logs on stderr before the readiness line: far past a pipe's 64 KiB, so an undrained pipe
    # would leave the child blocked in write() and the line never printed.
    code = ("import sys, time\n"
            "for i in range(4096): sys.stderr.write('log line %05d ' % i + 'x' * 1000 + '\\n')\n"
            "sys.stdout.write('decode listening on 127.0.0.1:41000\\n'); sys.stdout.flush()\n"
            "time.sleep(60)\n")
    child = launch(_python(code), name="chatty", service="decode")
    try:
        assert child.wait_ready(timeout_s=60) == "127.0.0.1:41000"
        assert child.poll() is None
        assert sum(1 for line in child.output.lines if line.startswith("log line")) == 4096
    finally:
        child.stop(5)


def test_a_line_split_across_writes_is_read_whole() -> None:
    # The first write alone would parse with the wrong port (:4).
    code = ("import sys, time\n"
            "sys.stdout.write('decode listening on 127.0.0.1:4'); sys.stdout.flush(); time.sleep(0.5)\n"
            "sys.stdout.write('2000\\n'); sys.stdout.flush(); time.sleep(60)\n")
    child = launch(_python(code), name="split")
    try:
        assert child.wait_ready(timeout_s=30) == "127.0.0.1:42000"
        assert child.addresses() == {GRPC: "127.0.0.1:42000"}
    finally:
        child.stop(5)


def test_other_services_lines_do_not_count() -> None:
    code = ("import sys, time\n"
            "print('prefill listening on 127.0.0.1:1', flush=True); time.sleep(60)\n")
    child = launch(_python(code), name="decode-0", service="decode")
    try:
        with pytest.raises(TimeoutError, match=r"decode-0 not ready in time[\s\S]*prefill listening on"):
            child.wait_ready(timeout_s=2)
    finally:
        child.stop(5)


def test_exit_before_ready_says_so_with_the_output() -> None:
    code = "import sys; print('cannot load the model: boom', file=sys.stderr); sys.exit(3)"
    child = launch(_python(code), name="doomed")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"doomed exited with code 3 before it was ready[\s\S]*boom"):
        child.wait_ready(timeout_s=60)
    assert time.monotonic() - t0 < 30  # told at the exit, not at the deadline


def test_deadline_and_a_stop_that_escalates_to_kill() -> None:
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('still loading', flush=True)\n"
            "time.sleep(600)\n")
    child = launch(_python(code), name="stubborn")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"stubborn not ready in time[\s\S]*still loading"):
        child.wait_ready(timeout_s=2)
    assert 2 <= time.monotonic() - t0 < 20
    t0 = time.monotonic()
    assert child.stop(timeout_s=1) == -signal.SIGKILL  # SIGTERM ignored: killed after the bound
    assert time.monotonic() - t0 < 15


def test_start_service_runs_moemesh_serve_and_stops_it_cleanly() -> None:
    eplb = start_service("eplb", ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"], cwd=ROOT,
                         ready_timeout_s=120)
    try:
        assert eplb.address.startswith("127.0.0.1:")
        eplb.wait_ready(METRICS, timeout_s=30)  # printed right after the gRPC line
        assert set(eplb.addresses()) == {GRPC, METRICS}
    finally:
        code = eplb.stop(30)
    assert code == 0


def test_start_service_stops_a_service_that_fails_and_reports_why() -> None:
    with pytest.raises(RuntimeError, match=r"exited with code 2 before it was ready[\s\S]*--no-such-option"):
        start_service("eplb", ["--no-such-option"], ready_timeout_s=60)


def test_start_mesh_reads_the_ready_file_and_up_removes_it_when_stopped() -> None:
    mesh = start_mesh(["--prefill", "0", "--decode", "1"], timeout_s=240, cwd=ROOT)
    try:
        ready_file = mesh.ready_file
        assert read_ready_file(ready_file) == list(mesh.services.values())
        assert list(mesh.services) == ["kvtransfer", "eplb", "gateway", "decode-0"]
        gateway = mesh.services["gateway"]
        assert gateway.http_address and all(r.metrics_address for r in mesh.services.values())
        assert len(mesh.alive_pids()) == 4
        # The table for people carries the same addresses.
        table = "\n".join(mesh.output.lines)
        assert "moemesh is up" in table
        assert all(r.address in table and r.metrics_address in table for r in mesh.services.values())
        assert gateway.http_address in table
        assert mesh.child.stop(30) == 0  # `moemesh up` itself, SIGTERM: it stops its services...
        assert not ready_file.exists()  # ...and a stopped mesh is not ready
    finally:
        mesh.stop()
    assert mesh.kill_leftovers(grace_s=5) == []
    assert not ready_file.parent.exists()  # the launcher's own folder for it
