"""`moemesh serve gateway` as a process: argv and MOEMESH_ options, readiness, clean exit, no torch."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.services.gateway.config import GatewayConfig
from moemesh.services.gateway.serve import add_arguments, config_from_args
from moemesh.telemetry.readiness import GRPC, parse_line
from moemesh.v1 import gateway_pb2, gateway_pb2_grpc
from tests.paths import ROOT
from tests.service.gateway.doubles import make_tokenizer_dir

pytestmark = pytest.mark.timeout(30)

# The gateway process must run where torch cannot even be imported.
NO_TORCH_MAIN = ("import sys; sys.modules['torch'] = None\n"
                 "from moemesh.services.gateway.serve import main\n"
                 "sys.exit(main(sys.argv[1:]))\n")


def _parse(argv: list[str], environ: dict[str, str]) -> GatewayConfig:
    parser = argparse.ArgumentParser()
    old = dict(os.environ)
    os.environ.update(environ)
    try:
        add_arguments(parser)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return config_from_args(parser.parse_args(argv))


def test_options_from_flags_and_environment() -> None:
    cfg = _parse(["--port", "0", "--model", "/m/tok", "--heartbeat-timeout-ms", "3000"],
                 {"MOEMESH_MAX_MODEL_LEN": "128", "MOEMESH_HEARTBEAT_TIMEOUT_MS": "9000"})
    assert (cfg.port, cfg.model_dir, cfg.max_model_len, cfg.heartbeat_timeout_ms) == (0, "/m/tok", 128, 3000)
    assert cfg.served_model_name == "tok" and GatewayConfig().served_model_name == "moemesh-tiny"
    with pytest.raises(ValueError, match="heartbeat_timeout_ms"):
        GatewayConfig(heartbeat_interval_ms=1000, heartbeat_timeout_ms=500)


def test_process_serves_without_torch_and_exits_cleanly(tmp_path: Path) -> None:
    model = make_tokenizer_dir(tmp_path / "tok")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MOEMESH_MAX_MODEL_LEN": "100"}
    proc = subprocess.Popen([sys.executable, "-c", NO_TORCH_MAIN, "--port", "0", "--http-port", "0",
                             "--model", str(model)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        ready = parse_line(line)
        assert ready is not None and (ready.service, ready.kind) == ("gateway", GRPC), (line, proc.stderr.read())
        address = ready.address
        assert address.startswith("127.0.0.1:"), line
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            resp = gateway_pb2_grpc.GatewayStub(channel).Tokenize(gateway_pb2.TokenizeRequest(text="hi"), timeout=5)
            assert resp.max_model_len == 100
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_model_folder_exits_with_a_message(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", NO_TORCH_MAIN, "--port", "0", "--model", str(tmp_path / "none")],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=20)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


@pytest.mark.parametrize(("options", "says"), [
    (["--tool-call-parser", "deepseek_v3"], "needs <｜tool▁calls▁begin｜>"),  # the plain tiny tokenizer lacks them
    (["--chat-template", "no/such/template.jinja"], "--chat-template: chat template 'no/such/template.jinja' is "
                                                    "neither a file"),
])
def test_chat_options_the_model_cannot_serve_stop_the_start(tmp_path: Path, options: list[str], says: str) -> None:
    model = make_tokenizer_dir(tmp_path / "tok")
    proc = subprocess.run([sys.executable, "-c", NO_TORCH_MAIN, "--port", "0", "--http-port", "-1", "--model",
                           str(model), *options], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
