"""A worker's readiness: its port answers NOT_SERVING while the model loads and again while draining."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.services.decode import serve as decode_serve
from moemesh.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from moemesh.worker import runtime as worker_mod
from tests.net import free_port


def test_not_serving_while_loading_then_serving_then_draining(small_dir: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    port = free_port()
    args = decode_serve.build_parser().parse_args(
        ["--port", str(port), "--gateway", "", "--transfer", "inproc", "--model", str(small_dir), "--kv-cache-mb", "8"])
    real_load = worker_mod.Worker.load

    async def run() -> None:
        loading = asyncio.Event()
        release = asyncio.Event()

        async def slow_load(*a, **kw):
            loading.set()
            await release.wait()
            return await real_load(*a, **kw)

        monkeypatch.setattr(worker_mod.Worker, "load", slow_load)
        ready, stop = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(decode_serve.serve(args, ready, stop))
        await asyncio.wait_for(loading.wait(), 30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            resp = await health.Check(health_pb2.HealthCheckRequest(service="moemesh.v1.Decode"), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await decode_pb2_grpc.DecodeStub(ch).GetLoad(common_pb2.GetLoadRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details()
            release.set()
            await asyncio.wait_for(ready.wait(), 60)
            resp = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            req = decode_pb2.DecodeRequest(prompt_token_ids=[0, 5, 6, 7], sampling=common_pb2.SamplingParams(
                max_tokens=3, temperature=0, ignore_eos=True))
            tokens = [t async for r in decode_pb2_grpc.DecodeStub(ch).Generate(req, timeout=30) for t in r.token_ids]
            assert len(tokens) == 3
            # Draining: with a request in flight the port stays open and health says NOT_SERVING.
            long = decode_pb2.DecodeRequest(prompt_token_ids=[0, 5], sampling=common_pb2.SamplingParams(
                max_tokens=3000, temperature=0, ignore_eos=True))
            call = decode_pb2_grpc.DecodeStub(ch).Generate(long, timeout=60)
            await call.read()
            stop.set()
            deadline = asyncio.get_running_loop().time() + 10
            while True:  # the stop is noticed by the serve task, not by this call: poll under a deadline
                resp = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                if resp.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                assert asyncio.get_running_loop().time() < deadline, "still SERVING while draining"
                await asyncio.sleep(0.02)
            assert not call.done()  # the request in flight is what keeps the port open
            call.cancel()
        await asyncio.wait_for(task, 30)

    asyncio.run(run())


@pytest.mark.parametrize("flags, warmed", [([], True), (["--no-warmup"], False)])
def test_a_worker_warms_its_engine_up_before_it_is_ready_unless_told_not_to(
        small_dir: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str], warmed: bool) -> None:
    args = decode_serve.build_parser().parse_args(
        ["--port", str(free_port()), "--gateway", "", "--transfer", "inproc", "--model", str(small_dir),
         "--kv-cache-mb", "8", *flags])
    calls: list[tuple[bool, int]] = []
    real_warm_up = worker_mod.warm_up

    async def run() -> None:
        ready, stop = asyncio.Event(), asyncio.Event()

        def recorded(engine):  # runs in a thread: records whether the worker was ready yet, and what it ran
            done = real_warm_up(engine)
            calls.append((ready.is_set(), len(done.prefill_sizes)))
            return done

        monkeypatch.setattr(worker_mod, "warm_up", recorded)
        task = asyncio.create_task(decode_serve.serve(args, ready, stop))
        await asyncio.wait_for(ready.wait(), 60)
        stop.set()
        await asyncio.wait_for(task, 30)

    asyncio.run(run())
    assert calls == ([(False, 2)] if warmed else [])
