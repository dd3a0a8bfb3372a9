"""The gateway's request lifecycle, free of gRPC servicer objects so the REST facade can share it.

    core = GatewayCore(load_served_model(cfg), registry)
    stream = core.open(request, timeout_s=...)   # validates and routes now: errors raise here
    async for response in stream:                # GenerateResponse messages
        ...

Errors are `shared.service.errors.ServiceError`s (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE,
DEADLINE_EXCEEDED, or a worker's own code): the gRPC interceptor maps them to status codes, a REST
facade maps `exc.code` to HTTP. Closing or cancelling the iteration (the client went away) cancels the
request on both workers.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator

from services.gateway.dispatch import AbortSender, Exchange
from services.gateway.inputs import PreparedRequest, check_model, prepare, render_messages
from services.gateway.model import ServedModel
from services.gateway.registry import DECODE, PREFILL, WorkerRegistry
from services.gateway.router import Route, Router
from shared.rpc.moemesh.v1 import gateway_pb2
from shared.service.errors import InvalidArgument

DEFAULT_REQUEST_TIMEOUT_S = 600.0


class GatewayCore:
    """Validate, tokenize, route, fan out and stream one request; tokenize; list models."""

    def __init__(self, model: ServedModel, registry: WorkerRegistry, router: Router | None = None,
                 default_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> None:
        self.model = model
        self.registry = registry
        self.router = router if router is not None else Router()
        self.default_timeout_s = default_timeout_s
        self.aborts = AbortSender(registry)

    def has_decode_workers(self) -> bool:
        """Readiness hook: a decode worker is registered and routable."""
        return self.registry.has_decode_workers()

    def prepare(self, req: gateway_pb2.GenerateRequest) -> PreparedRequest:
        """Validate and tokenize `req` (raises InvalidArgument / NotFound)."""
        return prepare(req, self.model.tokenizer, self.model.name, self.model.max_model_len)

    def route(self, prepared: PreparedRequest) -> Route:
        """Pick the workers of a prepared request (raises Unavailable when there are none)."""
        return self.router.route(self.registry.workers(DECODE), self.registry.workers(PREFILL),
                                 prepared.prompt_token_ids)

    def open(self, req: gateway_pb2.GenerateRequest,
             timeout_s: float | None = None) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """Validate, tokenize and route `req` now, then return its response stream to iterate.

        Errors in the request or the lack of a worker raise here, before any response exists (a REST
        facade can still answer 400/404/503 instead of starting an event stream). `timeout_s`: what
        is left of the client's deadline (None: the default request timeout); it bounds both
        downstream calls. Closing or cancelling the iteration cancels the request on both workers.
        """
        prepared = self.prepare(req)
        route = self.route(prepared)
        timeout = self.default_timeout_s if timeout_s is None else max(timeout_s, 0.0)
        return self._stream(prepared, route, timeout)

    async def generate(self, req: gateway_pb2.GenerateRequest,
                       timeout_s: float | None = None) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """`open` and iterate in one: yields the responses, the last with finish_reason and usage."""
        async for response in self.open(req, timeout_s):
            yield response

    async def _stream(self, prepared: PreparedRequest, route: Route,
                      timeout_s: float) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        room_id = uuid.uuid4().hex if route.prefill is not None else ""
        page_size = route.decode.kv_layout.page_size_tokens
        pages = math.ceil(len(prepared.prompt_token_ids) / page_size) if page_size else 0
        workers = [route.decode] if route.prefill is None else [route.decode, route.prefill]
        self.registry.acquire(route.decode, pages)
        if route.prefill is not None:
            self.registry.acquire(route.prefill)
        try:
            exchange = Exchange(self.registry, self.aborts, route, prepared, room_id, timeout_s)
            async for response in exchange.run():
                yield response
        finally:
            for worker in workers:
                self.registry.release(worker)

    def tokenize(self, req: gateway_pb2.TokenizeRequest) -> gateway_pb2.TokenizeResponse:
        """Token ids of a text (BOS when add_special_tokens) or of chat messages."""
        check_model(req.model, self.model.name)
        tokenizer = self.model.tokenizer
        which = req.WhichOneof("input")
        if which == "messages":
            ids = render_messages(tokenizer, req.messages)
        elif which == "text":
            ids = tokenizer.encode(req.text, add_special_tokens=req.add_special_tokens)
        else:
            raise InvalidArgument("set text or messages to tokenize")
        return gateway_pb2.TokenizeResponse(token_ids=ids, max_model_len=self.model.max_model_len)

    def list_models(self) -> gateway_pb2.ListModelsResponse:
        """The served model with its registered worker counts."""
        info = gateway_pb2.ModelInfo(
            id=self.model.name, max_model_len=self.model.max_model_len,
            num_prefill_workers=len(self.registry.workers(PREFILL)),
            num_decode_workers=len(self.registry.workers(DECODE)))
        return gateway_pb2.ListModelsResponse(models=[info])

    async def close(self) -> None:
        """Let pending aborts go out, then close the registry's channels."""
        await self.aborts.drain()
        await self.registry.close()
