"""`moemesh serve kvtransfer`: config checks, flags and MOEMESH_ variables, serve() and a real process."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.telemetry.readiness import GRPC, METRICS, parse_line
from tests.paths import ROOT


def test_process_starts_answers_health_and_exits_on_sigterm():
    code = ("import sys; from moemesh.services.kvtransfer.serve import main; "
            "sys.exit(main(['--port', '0', '--metrics-port', '0']))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "no listening line within 20 s"
        line = proc.stdout.readline()
        listening = parse_line(line)
        assert listening is not None and (listening.service, listening.kind) == ("kvtransfer", GRPC), \
            f"unexpected first line {line!r}"
        line = proc.stdout.readline()
        metrics = parse_line(line)
        assert metrics is not None and (metrics.service, metrics.kind) == ("kvtransfer", METRICS), \
            f"unexpected second line {line!r}"
        with grpc.insecure_channel(listening.address) as channel:
            r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - t0 < 5
        assert proc.stdout.read() == ""  # the metrics and listening lines are the only stdout
        # Ready, its start-up objects were frozen out of the collector's full passes (moemesh.service.heap).
        settled = [json.loads(line) for line in proc.stderr.read().splitlines() if "heap settled" in line]
        assert len(settled) == 1 and int(settled[0]["event"].split()[2]) > 1000, settled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
