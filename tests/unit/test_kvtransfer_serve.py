"""`moemesh serve kvtransfer`: config checks, flags and MOEMESH_ variables, serve() and a real process."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kvtransfer.config import KvTransferConfig
from services.kvtransfer.serve import add_arguments, config_from_args, serve

ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"^kvtransfer listening on (\S+:\d+)$")
METRICS = re.compile(r"^kvtransfer metrics on (\S+:\d+)$")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def test_config_defaults_and_validation():
    cfg = KvTransferConfig()
    assert (cfg.host, cfg.port) == ("127.0.0.1", 50060)
    with pytest.raises(ValueError, match="port 70000"):
        KvTransferConfig(port=70000)
    with pytest.raises(ValueError, match="default_lease_ms 5 exceeds max_lease_ms 4"):
        KvTransferConfig(default_lease_ms=5, max_lease_ms=4)
    with pytest.raises(ValueError, match="relay_room_max_bytes 10 exceeds relay_total_max_bytes 5"):
        KvTransferConfig(relay_room_max_bytes=10, relay_total_max_bytes=5)
    with pytest.raises(ValueError, match="sweep_interval_s must be positive"):
        KvTransferConfig(sweep_interval_s=0)


def test_every_field_has_a_flag_and_an_env_variable(monkeypatch):
    assert config_from_args(_parser().parse_args([])) == KvTransferConfig()
    monkeypatch.setenv("MOEMESH_MAX_ROOMS", "7")
    monkeypatch.setenv("MOEMESH_RETENTION_S", "1.5")
    monkeypatch.setenv("MOEMESH_PORT", "1234")
    cfg = config_from_args(_parser().parse_args(["--port", "0", "--relay-queue-chunks", "3"]))
    assert (cfg.max_rooms, cfg.retention_s, cfg.port, cfg.relay_queue_chunks) == (7, 1.5, 0, 3)
    options = {a.dest for a in _parser()._actions}
    assert {f for f in KvTransferConfig.__dataclass_fields__} <= options


def test_serve_prints_its_address_and_stops_on_the_event(capsys):
    async def main():
        ready, stop = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(serve(KvTransferConfig(port=0, drain_s=0), ready=ready, stop=stop))
        await asyncio.wait_for(ready.wait(), 5)
        m = LISTENING.match(capsys.readouterr().out.strip())
        assert m, "no listening line"
        async with grpc.aio.insecure_channel(m.group(1)) as channel:
            r = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())


def test_process_starts_answers_health_and_exits_on_sigterm():
    code = ("import sys; from services.kvtransfer.serve import main; "
            "sys.exit(main(['--port', '0', '--metrics-port', '0']))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "no listening line within 20 s"
        line = proc.stdout.readline().strip()
        m = LISTENING.match(line)
        assert m, f"unexpected first line {line!r}"
        line = proc.stdout.readline().strip()
        assert METRICS.match(line), f"unexpected second line {line!r}"
        with grpc.insecure_channel(m.group(1)) as channel:
            r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - t0 < 5
        assert proc.stdout.read() == ""  # the metrics and listening lines are the only stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
