"""`moemesh serve` processes with mutual TLS from MOEMESH_TLS_* variables, and a half-configured TLS
refused at start-up."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2

from moemesh.service.channel import mesh_channel
from moemesh.telemetry.readiness import GRPC, parse_line
from tests.paths import ROOT
from tests.pki import Pki
from tests.service.service.test_tls import (
    _check,
    _refused,
)

pytestmark = pytest.mark.timeout(60)


def test_service_process_serves_mtls_from_environment_variables(pki: Pki) -> None:
    """`moemesh serve kvtransfer` with MOEMESH_TLS_*: plain text refused, the mesh's certificate served."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MOEMESH_TLS_CERT": pki.path("tls.crt"),
           "MOEMESH_TLS_KEY": pki.path("tls.key"), "MOEMESH_TLS_CA": pki.path("ca.crt")}
    proc = subprocess.Popen([sys.executable, "-m", "moemesh.services.cli.main", "serve", "kvtransfer", "--port", "0",
                             "--metrics-port", "-1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "no listening line within 30 s"
        listening = parse_line(proc.stdout.readline())
        assert listening is not None and (listening.service, listening.kind) == ("kvtransfer", GRPC), \
            proc.stderr.read() if proc.poll() is not None else "unexpected first line"
        address = listening.address

        async def main() -> None:
            async with mesh_channel(address, tls=pki.client()) as ch:
                assert await _check(ch, "moemesh.v1.KvTransfer") == health_pb2.HealthCheckResponse.SERVING
            err = await _refused(grpc.aio.insecure_channel(address))
            assert err.code() == grpc.StatusCode.UNAVAILABLE

        asyncio.run(main())
        # The containers' health probe presents the service's own certificate from the same variables.
        probe = [sys.executable, str(ROOT / "deploy" / "healthcheck.py"), "--addr", address]
        result = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and "SERVING" in result.stdout, result.stdout + result.stderr
        plain = {k: v for k, v in env.items() if not k.startswith("MOEMESH_TLS_")}
        assert subprocess.run([*probe, "--timeout", "2"], env=plain, capture_output=True, timeout=30).returncode == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_half_configured_tls_stops_the_service_with_a_message(pki: Pki) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MOEMESH_TLS_CERT": pki.path("tls.crt")}
    for service in ("kvtransfer", "eplb"):
        proc = subprocess.run([sys.executable, "-m", "moemesh.services.cli.main", "serve", service, "--port", "0",
                               "--metrics-port", "-1"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 2, (service, proc.stderr)
        assert "needs --tls-cert, --tls-key and --tls-ca together" in proc.stderr, proc.stderr


# ---- message size limits -------------------------------------------------------------------------


