"""The OpenAI-compatible REST facade over real HTTP: the gateway's uvicorn, its core, fake workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from moemesh.telemetry.readiness import GRPC, HTTP, parse_line
from tests.paths import ROOT
from tests.service.gateway.doubles import (
    make_tokenizer_dir,
)
from tests.service.gateway.rest_doubles import error_of

pytestmark = pytest.mark.timeout(30)


def test_gateway_process_serves_rest_with_api_key_from_environment(tmp_path: Path) -> None:
    model = make_tokenizer_dir(tmp_path / "tok")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MOEMESH_API_KEY": "sesame", "MOEMESH_MAX_MODEL_LEN": "64"}
    code = ("import sys; sys.modules['torch'] = None\n"
            "from moemesh.services.gateway.serve import main\nsys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "--port", "0", "--http-port", "0", "--model", str(model)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        grpc_line, http_line = proc.stdout.readline(), proc.stdout.readline()
        grpc_ready, http_ready = parse_line(grpc_line), parse_line(http_line)
        assert grpc_ready is not None and (grpc_ready.service, grpc_ready.kind) == ("gateway", GRPC), grpc_line
        assert http_ready is not None and (http_ready.service, http_ready.kind) == ("gateway", HTTP), http_line
        assert http_ready.address.startswith("127.0.0.1:"), http_line
        with httpx.Client(base_url=f"http://{http_ready.address}", trust_env=False, timeout=10) as client:
            assert client.get("/health").status_code == 503  # no worker yet; probes need no key
            error_of(client.get("/v1/models"), 401)
            r = client.get("/v1/models", headers={"Authorization": "Bearer sesame"})
            assert r.status_code == 200 and r.json()["data"][0]["max_model_len"] == 64
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
