"""The worker registry: registration checks, heartbeats, timeouts, health marks (fake clock, no servers)."""

from __future__ import annotations

import pytest

from moemesh.service.errors import FailedPrecondition, InvalidArgument
from moemesh.service.version import PROTOCOL_VERSION
from moemesh.services.gateway.registry import DECODE, PREFILL, WorkerRegistry
from moemesh.v1 import common_pb2, gateway_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def register(registry: WorkerRegistry, worker_id: str = "w1", role: int = DECODE, **kw: object
             ) -> gateway_pb2.RegisterWorkerResponse:
    fields = dict(protocol_version=PROTOCOL_VERSION, worker_id=worker_id, role=role, address="127.0.0.1:9")
    fields.update(kw)
    return registry.register(gateway_pb2.RegisterWorkerRequest(**fields))


def test_register_answers_the_heartbeat_contract() -> None:
    registry = WorkerRegistry("m", heartbeat_interval_ms=250, heartbeat_timeout_ms=900)
    resp = register(registry, load=common_pb2.WorkerLoad(num_free_pages=7))
    assert resp.protocol_version == PROTOCOL_VERSION
    assert (resp.heartbeat_interval_ms, resp.heartbeat_timeout_ms) == (250, 900)
    (entry,) = registry.workers(DECODE)
    assert entry.load.num_free_pages == 7 and registry.workers(PREFILL) == []
    assert registry.has_decode_workers()


@pytest.mark.parametrize(("fields", "error", "match"), [
    ({"protocol_version": common_pb2.PROTOCOL_VERSION_UNSPECIFIED}, FailedPrecondition, "protocol"),
    ({"worker_id": ""}, InvalidArgument, "worker_id"),
    ({"address": ""}, InvalidArgument, "address"),
    ({"role": common_pb2.WORKER_ROLE_UNSPECIFIED}, InvalidArgument, "role"),
    ({"model_name": "another-model"}, FailedPrecondition, "another-model"),
])
def test_register_refuses_bad_workers(fields: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        register(WorkerRegistry("m"), **fields)


def test_model_aliases_are_accepted() -> None:
    registry = WorkerRegistry("moemesh-tiny", model_aliases=["tiny-v1-seed0"])
    register(registry, model_name="tiny-v1-seed0")
    register(registry, worker_id="w2", model_name="moemesh-tiny")
    assert len(registry.workers()) == 2


def test_heartbeat_updates_load_and_draining_and_unknown_workers_reregister() -> None:
    registry = WorkerRegistry("m")
    register(registry)
    assert registry.heartbeat(gateway_pb2.HeartbeatRequest(
        worker_id="w1", load=common_pb2.WorkerLoad(num_running_requests=3), draining=True)).known
    (entry,) = registry.workers()
    assert entry.load.num_running_requests == 3 and entry.draining and not entry.routable
    assert not registry.has_decode_workers()
    assert not registry.heartbeat(gateway_pb2.HeartbeatRequest(worker_id="nobody")).known


def test_silent_workers_are_swept() -> None:
    clock = Clock()
    registry = WorkerRegistry("m", heartbeat_interval_ms=100, heartbeat_timeout_ms=500, clock=clock)
    register(registry, "quiet")
    register(registry, "chatty")
    clock.now += 0.4
    registry.heartbeat(gateway_pb2.HeartbeatRequest(worker_id="chatty"))
    assert registry.sweep() == []
    clock.now += 0.2
    (dropped,) = registry.sweep()
    assert dropped.worker_id == "quiet" and dropped.removed
    assert [w.worker_id for w in registry.workers()] == ["chatty"]
    assert not registry.heartbeat(gateway_pb2.HeartbeatRequest(worker_id="quiet")).known


def test_unhealthy_until_the_next_heartbeat() -> None:
    registry = WorkerRegistry("m")
    register(registry)
    (entry,) = registry.workers()
    registry.mark_unhealthy(entry, "connection refused")
    assert not entry.routable and not registry.has_decode_workers()
    registry.heartbeat(gateway_pb2.HeartbeatRequest(worker_id="w1"))
    assert entry.routable


def test_deregister_and_reregister() -> None:
    registry = WorkerRegistry("m")
    register(registry)
    (old,) = registry.workers()
    registry.acquire(old, pages=4)
    assert old.in_flight == 1 and old.pending_pages == 4
    register(registry, address="127.0.0.1:10")  # the worker restarted elsewhere under the same id
    (new,) = registry.workers()
    assert new is not old and old.removed and new.address == "127.0.0.1:10"
    registry.release(old)
    assert old.in_flight == 0
    assert registry.deregister(gateway_pb2.DeregisterWorkerRequest(worker_id="w1")).removed
    assert not registry.deregister(gateway_pb2.DeregisterWorkerRequest(worker_id="w1")).removed
    assert registry.workers() == []
