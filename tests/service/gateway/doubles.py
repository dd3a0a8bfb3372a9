"""Test doubles for the gateway and SDK tests: minimal Decode and Prefill gRPC servers on loopback.

`FakeDecode` echoes deterministic tokens (prompt's last id + 1, + 2, ...) and records what reached
it (requests, their deadlines, cancellations, Aborts); `FakePrefill` records requests and answers or
fails as told (over `PrefillStream`, with the first token at once when `early`). `FakeWorker` serves
one of them on 127.0.0.1 and joins the gateway through the real
WorkerRegistry RPCs (Register, Heartbeat, Deregister). Run as a script, the module serves one fake
decode worker until killed (for the test of a worker that dies mid-request).

This module holds no tests; pytest collects it only because of its name.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import grpc

from moemesh.model.tiny_tokenizer import build_tiny_tokenizer
from moemesh.service.errors import PEER_CAUSE, UNAVAILABLE_CAUSE_KEY
from moemesh.service.server import announce
from moemesh.service.version import PROTOCOL_VERSION
from moemesh.services.gateway.config import GatewayConfig
from moemesh.services.gateway.serve import GatewayApp, start_gateway
from moemesh.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)

VOCAB = 1024
LAYOUT = common_pb2.KvLayout(model_fingerprint="fake-model", num_layers=4, page_size_tokens=16, kv_lora_rank=512,
                             qk_rope_head_dim=64, dtype=common_pb2.KV_DTYPE_FLOAT32)
MAX_MODEL_LEN = 256


def make_tokenizer_dir(path: Path) -> Path:
    """A tokenizer-only model folder (the tiny model's tokenizer; no weights, no torch)."""
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(path, vocab_size=VOCAB)
    return path


async def start_test_gateway(model_dir: Path, **overrides: Any) -> GatewayApp:
    """A gateway on 127.0.0.1:0 with fast heartbeats and a small context limit."""
    cfg = dict(port=0, model_dir=str(model_dir), heartbeat_interval_ms=100, heartbeat_timeout_ms=400,
               max_model_len=MAX_MODEL_LEN)
    cfg.update(overrides)
    return await start_gateway(GatewayConfig(**cfg))


def fake_token(prompt: list[int], i: int) -> int:
    """The i-th token FakeDecode generates for `prompt`."""
    return (prompt[-1] + 1 + i) % VOCAB


class FakeDecode(decode_pb2_grpc.DecodeServicer):
    """Streams `max_tokens` tokens, one message each, `token_delay_s` apart; `hang` never answers;
    `fail_after` tokens, fails with UNAVAILABLE (as the gateway reports a worker that went away)."""

    def __init__(self, token_delay_s: float = 0.0, hang: bool = False, fail_after: int | None = None) -> None:
        self.token_delay_s = token_delay_s
        self.hang = hang
        self.fail_after = fail_after
        self.requests: list[decode_pb2.DecodeRequest] = []
        self.deadlines: list[float | None] = []
        self.aborts: list[str] = []
        self.cancelled = asyncio.Event()
        self.aborted = asyncio.Event()
        self.started = asyncio.Event()

    async def Generate(self, request: decode_pb2.DecodeRequest, context: grpc.aio.ServicerContext) -> Any:
        self.requests.append(request)
        self.deadlines.append(context.time_remaining())
        self.started.set()
        prompt = list(request.prompt_token_ids)
        n = request.sampling.max_tokens
        try:
            if self.hang:
                await asyncio.sleep(3600)
            for i in range(n):
                if i == self.fail_after:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "fake decode failure")
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                token = fake_token(prompt, i)
                resp = decode_pb2.DecodeResponse(token_ids=[token], text=f"<{token}>",
                                                 num_prompt_tokens=len(prompt), num_cached_tokens=0)
                if request.sampling.HasField("logprobs"):
                    resp.logprobs.add(logprob=-0.5, top=[common_pb2.TokenLogprob(token_id=token, logprob=-0.5)])
                if token in request.sampling.stop_token_ids:
                    resp.finish_reason = common_pb2.FINISH_REASON_STOP
                    resp.stop_token_id = token
                    yield resp
                    return
                if i == n - 1:
                    resp.finish_reason = common_pb2.FINISH_REASON_LENGTH
                yield resp
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def Abort(self, request: common_pb2.AbortRequest, context: grpc.aio.ServicerContext) -> Any:
        self.aborts.append(request.request_id)
        self.aborted.set()
        return common_pb2.AbortResponse(aborted=True)

    async def GetLoad(self, request: common_pb2.GetLoadRequest, context: grpc.aio.ServicerContext) -> Any:
        return common_pb2.WorkerLoad()


class FakePrefill(prefill_pb2_grpc.PrefillServicer):
    """Answers after `delay_s`, or fails with `fail_code` (`peer_failure`: marked as a peer's failure, as the
    prefill service marks a failed KV handoff)."""

    def __init__(self, delay_s: float = 0.0, fail_code: grpc.StatusCode | None = None,
                 peer_failure: bool = False, early: bool = False) -> None:
        self.early = early  # PrefillStream sends FakeDecode's first token (and text) at once, before its delay
        self.delay_s = delay_s
        self.fail_code = fail_code
        self.peer_failure = peer_failure
        self.requests: list[prefill_pb2.PrefillRequest] = []
        self.aborts: list[str] = []
        self.cancelled = asyncio.Event()
        self.aborted = asyncio.Event()

    async def Prefill(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext) -> Any:
        self.requests.append(request)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        if self.fail_code is not None:
            marker = ((UNAVAILABLE_CAUSE_KEY, PEER_CAUSE),) if self.peer_failure else ()
            await context.abort(self.fail_code, "fake prefill failure", trailing_metadata=marker)
        return prefill_pb2.PrefillResponse(first_token_id=fake_token(list(request.prompt_token_ids), 0),
                                           num_cached_tokens=3)

    async def PrefillStream(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext) -> Any:
        if self.early:
            token = fake_token(list(request.prompt_token_ids), 0)
            logprobs = common_pb2.StepLogprobs(
                logprob=-0.5, top=[common_pb2.TokenLogprob(token_id=token, logprob=-0.5)])
            yield prefill_pb2.PrefillEvent(first=prefill_pb2.FirstTokenEvent(
                token_id=token, text=f"<{token}>",
                logprobs=logprobs if request.sampling.HasField("logprobs") else None))
        yield prefill_pb2.PrefillEvent(done=await self.Prefill(request, context))

    async def Abort(self, request: common_pb2.AbortRequest, context: grpc.aio.ServicerContext) -> Any:
        self.aborts.append(request.request_id)
        self.aborted.set()
        return common_pb2.AbortResponse(aborted=True)

    async def GetLoad(self, request: common_pb2.GetLoadRequest, context: grpc.aio.ServicerContext) -> Any:
        return common_pb2.WorkerLoad()


class FakeWorker:
    """Serves a fake servicer on loopback and keeps it registered with the gateway while `heartbeats`."""

    def __init__(self, gateway: str, servicer: FakeDecode | FakePrefill, worker_id: str,
                 layout: common_pb2.KvLayout = LAYOUT, load: common_pb2.WorkerLoad | None = None,
                 model_name: str = "", max_model_len: int = MAX_MODEL_LEN) -> None:
        self.gateway = gateway
        self.servicer = servicer
        self.worker_id = worker_id
        self.role = common_pb2.WORKER_ROLE_DECODE if isinstance(servicer, FakeDecode) \
            else common_pb2.WORKER_ROLE_PREFILL
        self.layout = layout
        self.load = load if load is not None else common_pb2.WorkerLoad(num_free_pages=100, num_total_pages=100)
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.draining = False
        self.heartbeats = True
        self.registrations = 0
        self.address = ""
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self._registry: gateway_pb2_grpc.WorkerRegistryStub | None = None
        self._task: asyncio.Task[None] | None = None
        self._interval_s = 0.1

    async def start(self) -> FakeWorker:
        self._server = grpc.aio.server()
        if isinstance(self.servicer, FakeDecode):
            decode_pb2_grpc.add_DecodeServicer_to_server(self.servicer, self._server)
        else:
            prefill_pb2_grpc.add_PrefillServicer_to_server(self.servicer, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self.address = f"127.0.0.1:{port}"
        self._channel = grpc.aio.insecure_channel(self.gateway)
        self._registry = gateway_pb2_grpc.WorkerRegistryStub(self._channel)
        await self.register()
        self._task = asyncio.get_running_loop().create_task(self._heartbeat_forever())
        return self

    def register_request(self) -> gateway_pb2.RegisterWorkerRequest:
        return gateway_pb2.RegisterWorkerRequest(
            protocol_version=PROTOCOL_VERSION, worker_id=self.worker_id, role=self.role, address=self.address,
            instance_id=self.worker_id, dp_rank=0, dp_size=1, model_name=self.model_name, kv_layout=self.layout,
            load=self.load, max_model_len=self.max_model_len)

    async def register(self) -> None:
        resp = await self._registry.Register(self.register_request(), timeout=5)
        self._interval_s = resp.heartbeat_interval_ms / 1000
        self.registrations += 1

    async def heartbeat(self) -> bool:
        """One heartbeat now; returns `known`."""
        resp = await self._registry.Heartbeat(gateway_pb2.HeartbeatRequest(
            worker_id=self.worker_id, load=self.load, draining=self.draining), timeout=5)
        return resp.known

    async def _heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            if self.heartbeats and not await self.heartbeat():
                await self.register()

    async def stop(self, deregister: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if deregister and self._registry is not None:
            try:
                await self._registry.Deregister(gateway_pb2.DeregisterWorkerRequest(worker_id=self.worker_id),
                                                timeout=2)
            except grpc.aio.AioRpcError:
                pass  # the gateway is already gone
        if self._server is not None:
            await self._server.stop(0)
        if self._channel is not None:
            await self._channel.close()


class Mesh:
    """A test gateway, fake workers joined to it and a Gateway stub; `async with Mesh(dir) as mesh:`."""

    def __init__(self, model_dir: Path, **gateway_overrides: Any) -> None:
        self.model_dir = model_dir
        self.gateway_overrides = gateway_overrides
        self.workers: list[FakeWorker] = []

    async def __aenter__(self) -> Mesh:
        self.app = await start_test_gateway(self.model_dir, **self.gateway_overrides)
        self.channel = grpc.aio.insecure_channel(self.app.address)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for w in self.workers:
            await w.stop()
        await self.channel.close()
        await self.app.stop(0.5)

    async def add(self, servicer: FakeDecode | FakePrefill, worker_id: str, **kw: Any) -> FakeWorker:
        worker = await FakeWorker(self.app.address, servicer, worker_id, **kw).start()
        self.workers.append(worker)
        return worker

    async def generate(self, timeout: float | None = None, **request: Any) -> list[gateway_pb2.GenerateResponse]:
        """All responses of one Generate call."""
        call = self.stub.Generate(gateway_pb2.GenerateRequest(**request), timeout=timeout)
        return [r async for r in call]


async def _serve_fake_decode(gateway: str, worker_id: str, token_delay_s: float) -> None:
    worker = await FakeWorker(gateway, FakeDecode(token_delay_s=token_delay_s), worker_id).start()
    announce("fake-decode", worker.address)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Serve one fake decode worker until killed.")
    parser.add_argument("gateway")
    parser.add_argument("worker_id")
    parser.add_argument("--token-delay-s", type=float, default=0.05)
    args = parser.parse_args()
    asyncio.run(_serve_fake_decode(args.gateway, args.worker_id, args.token_delay_s))
