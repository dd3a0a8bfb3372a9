"""`GatewayApp.drain`, what SIGTERM runs: new calls are refused at once (REST 503, gRPC UNAVAILABLE, both health
checks failing) while the calls in flight run to their end, up to the drain's deadline (or a second signal);
what is left then ends as a stop's grace expiry ends it. The gateway is the real one (uvicorn and grpc.aio on
loopback), its worker the fake decode of doubles.py, slowed so that the calls are mid-way when the drain begins."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.services.gateway.serve import GatewayApp
from moemesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.service.gateway.doubles import FakeDecode, FakeWorker, fake_token, make_tokenizer_dir, start_test_gateway
from tests.service.gateway.rest_doubles import error_of, sse_events

pytestmark = pytest.mark.timeout(30)

PROMPT = [7, 8, 9]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("drain") / "tok")


class _Calls:
    """One REST stream and one gRPC Generate stream, opened and read to their first token."""

    def __init__(self, client: httpx.AsyncClient, stub: gateway_pb2_grpc.GatewayStub, max_tokens: int) -> None:
        self.client, self.stub, self.max_tokens = client, stub, max_tokens

    async def __aenter__(self) -> _Calls:
        self._rest = self.client.stream("POST", "/v1/completions", json={
            "prompt": PROMPT, "max_tokens": self.max_tokens, "stream": True})
        response = await self._rest.__aenter__()
        assert response.status_code == 200
        self._lines = response.aiter_lines()
        self.rest_head = [await anext(self._lines)]
        assert self.rest_head[0].startswith("data: {")
        request = gateway_pb2.GenerateRequest(token_ids=gateway_pb2.TokenIds(ids=PROMPT),
                                              sampling=common_pb2.SamplingParams(max_tokens=self.max_tokens))
        self.grpc = self.stub.Generate(request, timeout=20)
        self.grpc_head = await self.grpc.read()
        assert self.grpc_head.token_ids
        return self

    async def rest_events(self) -> list[Any]:
        """The REST stream's events, read to its end (the first included)."""
        lines = self.rest_head + [line async for line in self._lines]
        return sse_events("\n".join(lines) + "\n")

    async def grpc_responses(self) -> list[gateway_pb2.GenerateResponse]:
        """The gRPC stream's responses, read to its end (the first included)."""
        responses = [self.grpc_head]
        while (response := await self.grpc.read()) is not grpc.aio.EOF:
            responses.append(response)
        return responses

    async def __aexit__(self, *exc: object) -> None:
        await self._rest.__aexit__(None, None, None)


@asynccontextmanager
async def _gateway(model_dir: Path, decode: FakeDecode) -> AsyncIterator[
        tuple[GatewayApp, httpx.AsyncClient, grpc.aio.Channel]]:
    """A test gateway with REST, `decode` registered with it, and clients of both APIs. The test drains it."""
    app = await start_test_gateway(model_dir, http_port=0)
    worker = await FakeWorker(app.address, decode, "d1").start()
    try:
        async with httpx.AsyncClient(base_url=f"http://{app.http_address}", trust_env=False, timeout=20) as client, \
                grpc.aio.insecure_channel(app.address) as channel:
            yield app, client, channel
    finally:
        await worker.stop(deregister=False)
        await app.stop(0)  # after the drain's own stop: nothing left to do, unless the test failed before it


def _full_text(n: int) -> str:
    return "".join(f"<{fake_token(PROMPT, i)}>" for i in range(n))


def test_drain_finishes_open_calls_and_refuses_new_ones(model_dir: Path) -> None:
    # 40 tokens 25 ms apart: a second of streaming, longer than the test gateway's heartbeat timeout (400 ms),
    # so the worker must go on heartbeating through the drain or be dropped with the calls on it.
    async def main() -> None:
        async with _gateway(model_dir, FakeDecode(token_delay_s=0.025)) as (app, client, channel):
            stub = gateway_pb2_grpc.GatewayStub(channel)
            async with _Calls(client, stub, max_tokens=40) as calls:
                started = time.monotonic()
                draining = asyncio.ensure_future(app.drain(20))
                await asyncio.sleep(0)  # the drain's first step: refuse from now on

                health = await client.get("/health")
                assert health.status_code == 503 and health.json()["status"] == "draining"
                refused = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                error = error_of(refused, 503)
                assert (error["type"], error["code"]) == ("service_unavailable_error", "unavailable")
                assert "shutting down" in error["message"] and refused.headers["connection"] == "close"
                assert (await client.get("/metrics")).status_code == 200  # scrapers still see the drain
                status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                         timeout=5)
                assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
                with pytest.raises(grpc.aio.AioRpcError) as new_call:
                    await stub.Tokenize(gateway_pb2.TokenizeRequest(text="hi"), timeout=5)
                assert new_call.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in new_call.value.details()

                events = await calls.rest_events()
                responses = await calls.grpc_responses()
            assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
            assert "".join(e["choices"][0]["text"] for e in events[:-1]) == _full_text(40)
            assert events[-2]["choices"][0]["finish_reason"] == "length"
            assert [t for r in responses for t in r.token_ids] == [fake_token(PROMPT, i) for i in range(40)]
            assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
            await asyncio.wait_for(draining, 10)
            assert time.monotonic() - started < 10  # ended with its calls, not at its 20 s deadline
            with pytest.raises(httpx.ConnectError):
                await client.get("/health")

    asyncio.run(main())


@pytest.mark.parametrize("end", ["deadline", "second signal"])
def test_what_outlives_the_drain_ends_as_at_a_stop(model_dir: Path, end: str) -> None:
    async def main() -> None:
        decode = FakeDecode(token_delay_s=0.05)  # 200 tokens: ten seconds, far past the drain
        async with _gateway(model_dir, decode) as (app, client, channel):
            async with _Calls(client, gateway_pb2_grpc.GatewayStub(channel), max_tokens=200) as calls:
                hurry = asyncio.Event()
                started = time.monotonic()
                draining = asyncio.ensure_future(app.drain(0.3 if end == "deadline" else 20, hurry))
                if end == "second signal":
                    await asyncio.sleep(0.3)
                    hurry.set()
                events = await calls.rest_events()
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await calls.grpc_responses()
            await asyncio.wait_for(draining, 5)
            elapsed = time.monotonic() - started
            assert events[-1] == "[DONE]" and "shutting down" in events[-2]["error"]["message"]
            assert len(events) < 200  # cut short, with a clean ending
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE  # grpc's own end of a stop's grace: retryable
            assert elapsed < 3, elapsed
            await asyncio.wait_for(decode.aborted.wait(), 5)  # and ended on the worker too

    asyncio.run(main())
