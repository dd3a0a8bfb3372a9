"""`moemesh serve kvtransfer`: config checks, flags and MOEMESH_ variables, serve() and a real process."""

from __future__ import annotations

import argparse
import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.services.kvtransfer.config import KvTransferConfig
from moemesh.services.kvtransfer.serve import add_arguments, config_from_args, serve
from moemesh.telemetry.readiness import GRPC, parse_line


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
        out = capsys.readouterr().out
        listening = parse_line(out)  # the whole output is the one line
        assert listening is not None and (listening.service, listening.kind) == ("kvtransfer", GRPC), out
        async with grpc.aio.insecure_channel(listening.address) as channel:
            r = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())


