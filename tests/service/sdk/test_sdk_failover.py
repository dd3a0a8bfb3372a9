"""Several gateways (real gateways on loopback, fake workers): a resumed request reaches the workers with what its
client has; a stream that breaks at one gateway goes on at the other with its tokens; bad resume fields are refused;
a worker registers with every gateway of its --gateway list or dns:/// name."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from moemesh.sdk import AsyncMeshClient, MeshClient, UnavailableError
from moemesh.services.gateway.registry import DECODE
from moemesh.worker.registration import GatewayRegistrations, parse_gateways, resolve
from tests.service.gateway.doubles import FakeDecode, FakeWorker, Mesh, fake_token, make_tokenizer_dir

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("failover") / "tok")


def test_a_resumed_request_reaches_the_worker_with_what_its_client_has(model_dir: Path) -> None:
    async def main() -> None:
        async with Mesh(model_dir) as mesh:
            decode = FakeDecode()
            await mesh.add(decode, "d1")
            responses = await mesh.generate(token_ids={"ids": [3, 4, 5]}, sampling={"max_tokens": 6},
                                            resume_token_ids=[7, 8], resume_text_offset=11)
            (req,) = decode.requests
            assert list(req.resume_token_ids) == [7, 8] and req.resume_text_chars == 11
            # Each response says where the stream stands in the model's text, counting from the resumed offset.
            offsets = [r.text_offset for r in responses]
            texts = [len(r.text) for r in responses]
            assert offsets == [11 + sum(texts[:i + 1]) for i in range(len(responses))]
            assert responses[-1].usage.completion_tokens == 2 + sum(len(r.token_ids) for r in responses)

    asyncio.run(main())


@pytest.mark.parametrize(("fields", "message"), [
    ({"resume_text_offset": 4}, "resume_text_offset is set but resume_token_ids is empty"),
    ({"resume_token_ids": [9] * 6}, "holds 6 tokens and max_tokens is 6: nothing is left to generate"),
    ({"resume_token_ids": [9, 5000]}, r"resume_token_ids\[1\] = 5000 is outside the vocabulary"),
])
def test_resume_fields_no_broken_stream_could_leave_are_refused(model_dir: Path, fields: dict, message: str) -> None:
    async def main() -> None:
        async with Mesh(model_dir) as mesh:
            await mesh.add(FakeDecode(), "d1")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await mesh.generate(token_ids={"ids": [3, 4]}, sampling={"max_tokens": 6}, **fields)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert re.search(message, info.value.details())

    asyncio.run(main())


async def _two_gateways(model_dir: Path, stack: contextlib.AsyncExitStack) -> tuple[Mesh, Mesh, FakeDecode]:
    """Gateway A, whose worker fails after 3 tokens, and gateway B, whose worker serves."""
    a, b = await stack.enter_async_context(Mesh(model_dir)), await stack.enter_async_context(Mesh(model_dir))
    await a.add(FakeDecode(fail_after=3), "da")
    good = FakeDecode()
    await b.add(good, "db")
    return a, b, good


def test_the_async_client_resumes_a_broken_stream_at_the_next_gateway(model_dir: Path) -> None:
    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            a, b, good = await _two_gateways(model_dir, stack)
            async with AsyncMeshClient([a.app.address, b.app.address], timeout_s=20) as client:
                chunks = [c async for c in client.stream(token_ids=[3, 4], max_tokens=10)]
            first = [fake_token([3, 4], i) for i in range(3)]
            (resumed,) = good.requests  # B got the request once, with the 3 tokens A's stream delivered
            assert list(resumed.resume_token_ids) == first
            assert resumed.resume_text_chars == sum(len(f"<{t}>") for t in first)
            assert [t for c in chunks for t in c.token_ids][:3] == first
            assert chunks[-1].finish_reason == "length"

    asyncio.run(main())


@contextlib.contextmanager
def _two_gateways_in_background(model_dir: Path) -> Iterator[tuple[Mesh, Mesh, FakeDecode]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    stack = contextlib.AsyncExitStack()
    try:
        yield asyncio.run_coroutine_threadsafe(_two_gateways(model_dir, stack), loop).result(20)
    finally:
        asyncio.run_coroutine_threadsafe(stack.aclose(), loop).result(20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_the_blocking_client_resumes_and_gives_up_after_max_resumes(model_dir: Path) -> None:
    with _two_gateways_in_background(model_dir) as (a, b, good):
        with MeshClient([a.app.address, b.app.address], timeout_s=20) as client:
            done = client.generate(token_ids=[3, 4], max_tokens=10)
        assert done.token_ids[:3] == [fake_token([3, 4], i) for i in range(3)]
        assert list(good.requests[0].resume_token_ids) == done.token_ids[:3]
        # Both gateways' workers failing: the stream breaks at A, then at A again (the turn comes back), and
        # the client stops after max_resumes with one error naming what it tried.
        with MeshClient([a.app.address, a.app.address], timeout_s=20, max_resumes=1) as client, \
                pytest.raises(UnavailableError, match=r"the stream broke 2 times \(max_resumes 1\); gateways tried"):
            client.generate(token_ids=[3, 4], max_tokens=10)


def test_the_workers_gateway_list_and_dns_name_are_parsed() -> None:
    assert parse_gateways("a:1, b:2") == (["a:1", "b:2"], None)
    assert parse_gateways("dns:///gw.mesh.svc:50051") == ([], "gw.mesh.svc:50051")
    for bad in ("dns:///gw:1,a:2", "dns:///gw"):
        with pytest.raises(ValueError):
            parse_gateways(bad)
    assert asyncio.run(resolve("localhost:50051")) in (["127.0.0.1:50051"], ["127.0.0.1:50051", "[::1]:50051"],
                                                        ["[::1]:50051"])


def test_a_worker_registers_with_every_gateway_of_a_list_or_a_dns_name(model_dir: Path) -> None:
    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            a, b = await stack.enter_async_context(Mesh(model_dir)), await stack.enter_async_context(Mesh(model_dir))
            worker = await FakeWorker(a.app.address, FakeDecode(), "w1").start()  # a server and its request
            await worker.stop()  # its own registration off: GatewayRegistrations does it below
            load = worker.register_request().load
            for spec, expected in ((f"{a.app.address},{b.app.address}", (a, b)),
                                   (f"dns:///localhost:{a.app.port}", (a,))):
                regs = GatewayRegistrations(spec, worker.register_request(), lambda: load, refresh_s=0.2)
                await regs.start()
                try:
                    for mesh in expected:
                        await _until(lambda m=mesh: [w.worker_id for w in m.app.registry.workers(DECODE)] == ["w1"])
                finally:
                    await regs.stop()
                for mesh in expected:  # stopping deregisters from each
                    await _until(lambda m=mesh: not m.app.registry.workers(DECODE))

    asyncio.run(main())


async def _until(check, timeout_s: float = 10) -> None:
    end = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < end, "not within the deadline"
        await asyncio.sleep(0.02)
