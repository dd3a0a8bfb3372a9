"""A decode worker process (the fake of tests/service/gateway/doubles.py) killed mid-request: the gateway ends the
stream with UNAVAILABLE."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc
import pytest

from moemesh.services.gateway.registry import DECODE
from moemesh.telemetry.readiness import parse_line
from moemesh.v1 import common_pb2, gateway_pb2
from tests.paths import ROOT
from tests.service.gateway.doubles import Mesh, make_tokenizer_dir
from tests.service.gateway.test_gateway import _rpc_error, _wait_for

pytestmark = pytest.mark.timeout(30)
DOUBLES = ROOT / "tests" / "service" / "gateway" / "doubles.py"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("gateway") / "tok")


def test_decode_worker_dying_mid_request_ends_the_stream_with_unavailable(model_dir: Path) -> None:
    async def main() -> None:
        async with Mesh(model_dir, heartbeat_timeout_ms=5000) as mesh:
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(DOUBLES), mesh.app.address, "dying", stdout=asyncio.subprocess.PIPE, env=env)
            try:
                line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
                ready = parse_line(line)
                assert ready is not None, line
                address = ready.address
                assert mesh.app.registry.get("dying") is not None
                call = mesh.stub.Generate(gateway_pb2.GenerateRequest(
                    prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=200)), timeout=20)
                assert (await call.read()).token_ids
                proc.send_signal(signal.SIGKILL)
                with pytest.raises(grpc.aio.AioRpcError) as excinfo:
                    while True:
                        assert await call.read() is not grpc.aio.EOF
                code, details = _rpc_error(excinfo)
                assert code == grpc.StatusCode.UNAVAILABLE
                assert f"decode worker dying at {address}" in details
                assert not mesh.app.registry.get("dying").routable
                await _wait_for(lambda: mesh.app.registry.workers(DECODE)[0].in_flight == 0)
            finally:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()

    asyncio.run(main())


