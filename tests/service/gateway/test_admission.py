"""Overload handling in isolation: the scheduler's bounded queue, the gateway's admission (pure asyncio),
and the retry hint at both edges (gRPC trailing metadata `retry-after-ms`, REST 429 with `Retry-After`)."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
from fastapi import FastAPI

from moemesh.engine.errors import KvCacheTooSmall, QueueFull, RequestTooLong
from moemesh.engine.request import Request, RequestStatus
from moemesh.engine.sampling_params import SamplingParams
from moemesh.engine.scheduler import Scheduler, SchedulerConfig
from moemesh.service import server as grpc_server
from moemesh.service.config import apply_env_defaults
from moemesh.service.errors import (
    DEFAULT_RETRY_AFTER_S,
    RETRY_AFTER_KEY,
    InvalidArgument,
    ResourceExhausted,
    retry_after_from_metadata,
    retry_hint_s,
    status_of,
    trailing_metadata_of,
)
from moemesh.services.gateway.admission import Admission, AdmissionConfig, add_admission_arguments, admission_config
from moemesh.services.gateway.registry import DECODE, WorkerEntry
from moemesh.services.gateway.rest import errors as rest_errors
from moemesh.v1 import common_pb2
from moemesh.worker.engine_args import DEFAULT_MAX_WAITING_REQUESTS, add_engine_arguments, engine_config

pytestmark = pytest.mark.timeout(60)
PAGE = 16


# ---- the worker: a bounded waiting queue -------------------------------------------------------
def scheduler(max_waiting: int | None = 2, num_pages: int = 8, max_model_len: int = 100) -> Scheduler:
    return Scheduler(SchedulerConfig(num_pages=num_pages, page_size=PAGE, max_model_len=max_model_len,
                                     max_num_seqs=1, max_waiting_requests=max_waiting))


def request(i: int, n: int = 5) -> Request:
    return Request(f"r{i}", list(range(1, n + 1)), SamplingParams(max_tokens=4))


def test_a_full_queue_refuses_at_once_and_takes_requests_again_once_it_drains() -> None:
    s = scheduler(max_waiting=2)
    s.add(request(0))
    s.reserve(request(1))  # reserving (PD decode) requests wait in the same bounded queue
    with pytest.raises(QueueFull, match=r"queue is full: 2 requests .*max_waiting_requests=2") as info:
        s.add(request(2))
    assert info.value.retry_after_s > 0
    with pytest.raises(QueueFull):
        s.reserve(request(3))
    assert s.num_queued == 2 and [r.request_id for r in s.waiting] == ["r0"]  # nothing half-queued
    s.schedule()  # both get pages: the queue has room again
    assert s.num_queued == 0
    s.add(request(4))
    s.add(request(5))
    assert s.waiting[-1].status is RequestStatus.WAITING
    with pytest.raises(QueueFull):
        s.add(request(6))


def test_no_bound_by_default_and_preempted_requests_always_go_back() -> None:
    s = scheduler(max_waiting=None)
    for i in range(500):
        s.add(request(i))
    assert s.num_queued == 500
    bounded = scheduler(max_waiting=1)
    first = request(0)
    bounded.add(first)
    bounded.schedule()  # admitted, now prefilling: the queue is empty
    bounded.add(request(1))
    bounded.prefilling.remove(first)
    bounded.running.append(first)
    first.status = RequestStatus.RUNNING
    bounded._preempt(first)  # an admitted request is never refused for the queue's length
    assert bounded.num_queued == 2 and bounded.waiting[0] is first


def test_a_prompt_beyond_the_whole_cache_is_resource_exhausted_beyond_the_context_invalid() -> None:
    # The cache caps the context (8 pages x 16 = 128 tokens): "more KV than this worker has".
    s = scheduler(num_pages=8, max_model_len=128)
    with pytest.raises(KvCacheTooSmall, match=r"need 9 KV pages .* whole KV cache \(8 pages\)"):
        s.add(request(0, n=128))
    with pytest.raises(KvCacheTooSmall):
        s.reserve(request(1, n=200))
    assert status_of(KvCacheTooSmall("x"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A context shorter than the cache: the prompt is too long for the model, not for this worker.
    s = scheduler(num_pages=8, max_model_len=100)
    with pytest.raises(RequestTooLong, match="context limit is 100") as info:
        s.add(request(0, n=100))
    assert not isinstance(info.value, KvCacheTooSmall)
    assert status_of(info.value)[0] == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(RequestTooLong, match="empty"):
        s.add(request(0, n=0))
    s.add(request(0, n=99))  # the longest that fits


def test_scheduler_config_validates_the_bound() -> None:
    with pytest.raises(ValueError, match="max_waiting_requests"):
        SchedulerConfig(num_pages=8, page_size=PAGE, max_model_len=64, max_waiting_requests=0)


def test_worker_option_max_waiting_requests() -> None:
    def parse(argv: list[str], env: dict[str, str] | None = None) -> argparse.Namespace:
        p = argparse.ArgumentParser()
        add_engine_arguments(p)
        apply_env_defaults(p, env or {})
        return p.parse_args(argv)

    assert parse([]).max_waiting_requests == DEFAULT_MAX_WAITING_REQUESTS == 256
    assert parse(["--max-waiting-requests", "4"]).max_waiting_requests == 4
    assert parse([], {"MOEMESH_MAX_WAITING_REQUESTS": "9"}).max_waiting_requests == 9
    cfg = engine_config(parse(["--max-waiting-requests", "4"]))
    # Carried by EngineConfig to the scheduler, once EngineConfig has the field.
    assert getattr(cfg, "max_waiting_requests", 4) == 4


# ---- the status mapping and the retry hint -----------------------------------------------------
def test_resource_exhausted_carries_a_retry_hint_as_trailing_metadata() -> None:
    full = QueueFull("queue full", retry_after_s=0.25)
    assert status_of(full) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
    assert retry_hint_s(full) == 0.25
    assert trailing_metadata_of(full) == ((RETRY_AFTER_KEY, "250"),)
    assert retry_hint_s(ResourceExhausted("busy")) == DEFAULT_RETRY_AFTER_S  # no hint of its own
    assert trailing_metadata_of(ResourceExhausted("busy", retry_after_s=2)) == (("retry-after-ms", "2000"),)
    assert retry_hint_s(InvalidArgument("bad")) is None and trailing_metadata_of(InvalidArgument("bad")) == ()
    assert retry_hint_s(RuntimeError("bug")) is None
    assert retry_after_from_metadata((("other", "1"), (RETRY_AFTER_KEY, "1500"))) == 1.5
    assert retry_after_from_metadata((("retry-after-ms", "soon"),)) is None
    assert retry_after_from_metadata(None) is None


def test_grpc_refusal_has_status_and_retry_after_ms() -> None:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise ResourceExhausted("gateway full", retry_after_s=0.3)

    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        raise QueueFull("queue full", retry_after_s=2.0)
        yield b""

    def register(_: object, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Overload", {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream)}),))

    async def main() -> None:
        server = grpc_server.GrpcServer("127.0.0.1", 0)
        server.add(register, None, "test.Overload")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await channel.unary_unary("/test.Overload/Unary")(b"", timeout=5)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert info.value.details() == "gateway full"
                assert retry_after_from_metadata(info.value.trailing_metadata()) == 0.3
                call = channel.unary_stream("/test.Overload/Stream")(b"", timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in call:
                        pass
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert retry_after_from_metadata(info.value.trailing_metadata()) == 2.0
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_rest_429_has_retry_after_in_whole_seconds_and_an_openai_error_body() -> None:
    app = FastAPI()
    rest_errors.install(app)
    raised: dict[str, Exception] = {
        "gateway": ResourceExhausted("the mesh is at capacity", retry_after_s=2.2),
        "worker": QueueFull("this worker's queue is full", retry_after_s=0.1),
        "bad": InvalidArgument("bad input"),
    }

    @app.get("/{what}")
    async def fail(what: str) -> None:
        raise raised[what]

    async def main() -> None:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            r = await client.get("/gateway")
            assert r.status_code == 429 and r.headers["retry-after"] == "3"
            assert r.json() == {"error": {"message": "the mesh is at capacity", "type": "rate_limit_error",
                                          "param": None, "code": "resource_exhausted"}}
            r = await client.get("/worker")  # sub-second hints round up: Retry-After is >= 1
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            r = await client.get("/bad")
            assert r.status_code == 400 and "retry-after" not in r.headers

    asyncio.run(main())


# ---- the gateway: admission ------------------------------------------------------------------
def decode_worker(worker_id: str, free: int, total: int = 100, page_size: int = PAGE, **kw: object) -> WorkerEntry:
    return WorkerEntry(worker_id=worker_id, role=DECODE, address="127.0.0.1:1",
                       kv_layout=common_pb2.KvLayout(page_size_tokens=page_size),
                       load=common_pb2.WorkerLoad(num_free_pages=free, num_total_pages=total), **kw)


def test_in_flight_bound_refuses_at_once_with_a_hint_and_release_frees_the_slot() -> None:
    async def main() -> None:
        adm = Admission(AdmissionConfig(max_concurrent_requests=2, retry_after_s=1.5))
        a, b = await adm.acquire(10), await adm.acquire(10)
        assert adm.num_in_flight == 2 and not a.waited
        t0 = time.monotonic()
        with pytest.raises(ResourceExhausted, match=r"2 requests are in flight.*retry in about 1.5 s") as info:
            await adm.acquire(10)
        assert time.monotonic() - t0 < 0.1 and info.value.retry_after_s == 1.5
        assert retry_hint_s(info.value) == 1.5 and adm.num_refused == 1
        a.release()
        a.release()  # idempotent: a second release frees nothing more
        assert adm.num_in_flight == 1
        async with await adm.acquire(10) as c:
            assert adm.num_in_flight == 2
        assert c.released and adm.num_in_flight == 1
        with adm.try_acquire(10):
            with pytest.raises(ResourceExhausted):
                adm.try_acquire(10)
        adm.release(b)
        assert adm.num_in_flight == 0 and adm.num_admitted == 4

    asyncio.run(main())


def test_bounded_wait_first_come_first_served() -> None:
    async def main() -> None:
        adm = Admission(AdmissionConfig(max_concurrent_requests=1, max_queue_wait_ms=2000, max_queued_requests=3))
        held = await adm.acquire(1)
        order: list[int] = []

        async def waiter(i: int) -> None:
            permit = await adm.acquire(1)
            order.append(i)
            assert permit.waited and permit.waited_s > 0
            await asyncio.sleep(0.01)
            permit.release()

        tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
        await asyncio.sleep(0.05)
        assert adm.num_waiting == 3
        # A newcomer does not overtake them, even with try_acquire.
        with pytest.raises(ResourceExhausted, match="3 earlier requests still wait"):
            adm.try_acquire(1)
        held.release()
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2] and adm.num_in_flight == 0 and adm.num_waiting == 0

    asyncio.run(main())


def test_the_wait_is_bounded_in_time_and_in_waiters_and_cancelling_leaves_nothing() -> None:
    async def main() -> None:
        adm = Admission(AdmissionConfig(max_concurrent_requests=1, max_queue_wait_ms=150, max_queued_requests=2))
        held = await adm.acquire(1)
        t0 = time.monotonic()
        with pytest.raises(ResourceExhausted, match="waited 150 ms"):
            await adm.acquire(1)
        assert 0.14 <= time.monotonic() - t0 < 1.0
        waiters = [asyncio.create_task(adm.acquire(1)) for _ in range(2)]
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(ResourceExhausted, match="2 requests already wait for a slot"):
            await adm.acquire(1)  # the queue is full: refused at once, not after the wait
        assert time.monotonic() - t0 < 0.05
        for task in waiters:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        assert adm.num_waiting == 0 and adm.num_in_flight == 1
        held.release()
        (await adm.acquire(1)).release()
        assert adm.num_in_flight == 0

    asyncio.run(main())


def test_kv_admission_by_the_decode_workers_free_pages() -> None:
    async def main() -> None:
        workers = [decode_worker("d1", free=3), decode_worker("d2", free=5)]
        adm = Admission(AdmissionConfig(), lambda: workers)
        (await adm.acquire(5 * PAGE)).release()  # 5 pages: d2 has them
        with pytest.raises(ResourceExhausted, match=r"no decode worker has the 6 free KV pages .* d2\)") as info:
            await adm.acquire(5 * PAGE + 1)
        assert info.value.retry_after_s == DEFAULT_RETRY_AFTER_S
        workers[1].pending_pages = 3  # sent since d2's last report: they count against its free pages
        with pytest.raises(ResourceExhausted, match=r"the most free: 3 on d1"):
            await adm.acquire(4 * PAGE)
        # Workers that cannot be routed to are the router's to explain (UNAVAILABLE), not admission's.
        assert Admission(AdmissionConfig(), lambda: [decode_worker("d3", free=0, draining=True)]).try_acquire(50)
        assert Admission(AdmissionConfig(), list).try_acquire(50)
        # A worker that has not reported its pages yet is not refused for them.
        assert Admission(AdmissionConfig(), lambda: [decode_worker("d4", free=0, total=0)]).try_acquire(50)
        off = Admission(AdmissionConfig(kv_admission=False), lambda: workers)
        assert off.try_acquire(10_000)

    asyncio.run(main())


def test_a_waiter_gets_in_when_a_heartbeat_reports_free_pages() -> None:
    async def main() -> None:
        worker = decode_worker("d1", free=1)
        adm = Admission(AdmissionConfig(max_queue_wait_ms=2000), lambda: [worker])
        task = asyncio.create_task(adm.acquire(4 * PAGE))
        await asyncio.sleep(0.1)
        assert not task.done() and adm.num_waiting == 1
        worker.load = common_pb2.WorkerLoad(num_free_pages=10, num_total_pages=100)  # a heartbeat, unannounced
        permit = await asyncio.wait_for(task, 1.0)
        assert permit.waited and adm.num_in_flight == 1

    asyncio.run(main())


def test_admission_options() -> None:
    p = argparse.ArgumentParser()
    add_admission_arguments(p)
    apply_env_defaults(p, {"MOEMESH_MAX_QUEUE_WAIT_MS": "250"})
    cfg = admission_config(p.parse_args(["--max-concurrent-requests", "8"]))
    assert cfg == AdmissionConfig(max_concurrent_requests=8, max_queue_wait_ms=250)
    assert cfg.queue_bound == 8
    assert not admission_config(p.parse_args(["--no-kv-admission"])).kv_admission
    assert AdmissionConfig().max_concurrent_requests == 1024 and AdmissionConfig().max_queue_wait_ms == 0
    for bad in ({"max_concurrent_requests": 0}, {"max_queue_wait_ms": -1}, {"max_queued_requests": -1},
                {"retry_after_s": 0}):
        with pytest.raises(ValueError):
            AdmissionConfig(**bad)
