"""The gateway's request lifecycle, free of gRPC servicer objects so the REST facade can share it.

    core = GatewayCore(load_served_model(cfg), registry)
    stream = core.open(request, timeout_s=...)   # validates and routes now: errors raise here
    async for response in stream:                # GenerateResponse messages
        ...

Errors are `moemesh.service.errors.ServiceError`s (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE,
DEADLINE_EXCEEDED, or a worker's own code): the gRPC interceptor maps them to status codes, a REST
facade maps `exc.code` to HTTP. Closing or cancelling the iteration (the client went away) cancels the
request on both workers.

Telemetry: a request is one `gateway.generate` span (child of the caller's span: the gRPC call's, or
the HTTP `traceparent` a REST handler made current with `moemesh.telemetry.http_trace_context`), with
`gateway.tokenize` and `gateway.route` inside; its downstream calls carry the span's context. Its log
lines carry `request_id` and `trace_id`. Metrics (role "gateway"): time to first token, inter-token
latency, end-to-end latency, tokens, outcomes, and requests in flight.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from opentelemetry import trace

from moemesh.service.errors import InvalidArgument, ServiceError, Unavailable
from moemesh.services.gateway.admission import Admission
from moemesh.services.gateway.chat_output import ResponseParser
from moemesh.services.gateway.dispatch import AbortSender, Exchange, WorkerStreamBroken
from moemesh.services.gateway.inputs import PreparedRequest, check_model, prepare
from moemesh.services.gateway.model import ServedModel
from moemesh.services.gateway.pd_health import KvTransferHealth
from moemesh.services.gateway.registry import DECODE, PREFILL, WorkerRegistry
from moemesh.services.gateway.router import PrefixAffinityRouter, Route, Router
from moemesh.telemetry import metrics
from moemesh.telemetry.logs import request_log_context
from moemesh.telemetry.tracing import end_span, tracer
from moemesh.v1 import common_pb2, gateway_pb2

log = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT_S = 600.0
DEFAULT_MAX_MIGRATIONS = 2
# Failures after which a request continues on other workers: the worker or its stream went away.
# A worker's verdict on the request itself (invalid, too long, deadline) is final.
MIGRATABLE = (Unavailable, WorkerStreamBroken)


class GatewayCore:
    """Validate, tokenize, route, fan out and stream one request; tokenize; list models."""

    def __init__(self, model: ServedModel, registry: WorkerRegistry, router: Router | None = None,
                 default_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                 max_migrations: int = DEFAULT_MAX_MIGRATIONS,
                 admission: Admission | None = None, pd_health: KvTransferHealth | None = None) -> None:
        """`max_migrations`: how many times one request may move to other workers after theirs failed.
        `pd_health`: kvtransfer's availability; while it is away, requests run colocated."""
        self.model = model
        self.max_migrations = max_migrations
        self.admission = admission if admission is not None else Admission(
            decode_workers=lambda: registry.workers(DECODE))
        self.pd_health = pd_health
        self.registry = registry
        self.router = router if router is not None else PrefixAffinityRouter()
        self.default_timeout_s = default_timeout_s
        self.aborts = AbortSender(registry)
        self.num_in_flight = 0
        metrics.register_load_source("gateway", self, lambda core: {"num_running": core.num_in_flight})

    def has_decode_workers(self) -> bool:
        """Readiness hook: a decode worker is registered and routable."""
        return self.registry.has_decode_workers()

    def prepare(self, req: gateway_pb2.GenerateRequest) -> PreparedRequest:
        """Validate and tokenize `req` (raises InvalidArgument / NotFound)."""
        return prepare(req, self.model.renderer, self.model.name, self.model.max_model_len)

    def route(self, prepared: PreparedRequest) -> Route:
        """Pick the workers of a prepared request (raises Unavailable when there are none)."""
        return self.router.route(self.registry.workers(DECODE), self._prefill_workers(), prepared.prompt_token_ids)

    def _prefill_workers(self, exclude: set[str] = frozenset()) -> list:
        """Prefill workers to route to: none while kvtransfer is away (decode workers prefill then)."""
        if self.pd_health is not None and not self.pd_health.available:
            return []
        return [w for w in self.registry.workers(PREFILL) if w.worker_id not in exclude]

    def open(self, req: gateway_pb2.GenerateRequest,
             timeout_s: float | None = None) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """Validate, tokenize and route `req` now, then return its response stream to iterate.

        Errors in the request or the lack of a worker raise here, before any response exists (a REST
        facade can still answer 400/404/503 instead of starting an event stream). `timeout_s`: what
        is left of the client's deadline (None: the default request timeout); it bounds both
        downstream calls. Closing or cancelling the iteration cancels the request on both workers.
        """
        arrival = time.monotonic()
        span = tracer.start_span("gateway.generate")  # a child of the caller's current span
        ctx = trace.set_span_in_context(span)
        try:
            with tracer.start_as_current_span("gateway.tokenize", context=ctx):
                prepared = self.prepare(req)
            span.set_attributes({"moemesh.request_id": prepared.request_id,
                                 "moemesh.num_prompt_tokens": len(prepared.prompt_token_ids)})
            with tracer.start_as_current_span("gateway.route", context=ctx) as route_span:
                route = self.route(prepared)
                route_span.set_attribute("moemesh.decode_worker", route.decode.worker_id)
                if route.prefill is not None:
                    route_span.set_attribute("moemesh.prefill_worker", route.prefill.worker_id)
        except BaseException as e:
            metrics.REQUESTS.labels("gateway", _outcome(e)).inc()
            end_span(span, e)
            raise
        timeout = self.default_timeout_s if timeout_s is None else max(timeout_s, 0.0)
        # A chat response's reasoning and tool calls are split out here, once, for REST and gRPC alike.
        parser = self.model.chat.for_request(prepared.prompt_token_ids, prepared.tools, prepared.sampling) \
            if prepared.chat else None
        if parser is not None and prepared.resume_token_ids:
            parser.resume(prepared.resume_token_ids)
        return self._stream(prepared, route, timeout, span, arrival, parser)

    async def generate(self, req: gateway_pb2.GenerateRequest,
                       timeout_s: float | None = None) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """`open` and iterate in one: yields the responses, the last with finish_reason and usage."""
        async for response in self.open(req, timeout_s):
            yield response

    async def _stream(self, prepared: PreparedRequest, route: Route, timeout_s: float, span: trace.Span,
                      arrival: float,
                      parser: ResponseParser | None = None) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        deadline = time.monotonic() + timeout_s
        resume = Progress(prepared.resume_token_ids, prepared.resume_text_offset)
        self.num_in_flight += 1
        with request_log_context(prepared.request_id, trace_id=_trace_id(span)):
            error: BaseException | None = None
            tokens = _TokenTimes(arrival)
            finish = ""
            permit = None
            try:
                permit = await self.admission.acquire(len(prepared.prompt_token_ids))
                if permit.waited:  # the route predates the wait: choose again with the load as it is now
                    route = self.route(prepared)
                while True:
                    try:
                        async for response in self._attempt(prepared, route, deadline, span, resume):
                            tokens.observe(len(response.token_ids))
                            resume.add(response)  # the worker's own text: a migration resumes after it
                            if parser is not None:
                                response = parser.apply(response)
                            response.text_offset = resume.text_chars  # a client resuming elsewhere goes on here
                            if response.finish_reason:
                                finish = common_pb2.FinishReason.Name(response.finish_reason)
                            yield response
                        return
                    except MIGRATABLE as e:
                        route = await self._migration_route(prepared, route, resume, deadline, e)
            except BaseException as e:
                error = e
                raise
            finally:
                if permit is not None:
                    permit.release()
                self.num_in_flight -= 1
                self._record(prepared, span, arrival, tokens, error, finish)

    async def _attempt(self, prepared: PreparedRequest, route: Route, deadline: float, span: trace.Span,
                       resume: Progress) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """One try on one (prefill, decode) pair, continuing after what the client already has."""
        room_id = uuid.uuid4().hex if route.prefill is not None else ""
        page_size = route.decode.kv_layout.page_size_tokens
        num_tokens = len(prepared.prompt_token_ids) + len(resume.token_ids)
        pages = math.ceil(num_tokens / page_size) if page_size else 0
        workers = [route.decode] if route.prefill is None else [route.decode, route.prefill]
        self.registry.acquire(route.decode, pages)
        if route.prefill is not None:
            self.registry.acquire(route.prefill)
        if room_id:
            span.set_attribute("moemesh.room_id", room_id)
        try:
            exchange = Exchange(self.registry, self.aborts, route, prepared, room_id,
                                max(deadline - time.monotonic(), 0.0), trace.set_span_in_context(span),
                                resume_token_ids=resume.token_ids, resume_text_chars=resume.text_chars)
            async for response in exchange.run():
                yield response
        finally:
            for worker in workers:
                self.registry.release(worker)

    async def _migration_route(self, prepared: PreparedRequest, failed: Route, resume: Progress, deadline: float,
                               error: BaseException) -> Route:
        """Where a request whose workers failed continues, or re-raise `error` when it cannot."""
        resume.migrations += 1
        if resume.migrations > self.max_migrations or time.monotonic() >= deadline:
            raise error
        # A failed handoff may mean kvtransfer is gone: then the workers are fine (their errors said a
        # peer failed, so neither was marked unhealthy), and the request runs colocated from now on (on
        # the same decode worker if it is the best one).
        kv_down = failed.prefill is not None and self.pd_health is not None and not await self.pd_health.check()
        if not kv_down:
            if getattr(error, "worker_id", None):
                resume.failed.add(error.worker_id)  # the worker that failed; its partner is fine
            else:
                resume.failed.update(w.worker_id for w in (failed.decode, failed.prefill) if w is not None)
        decodes = [w for w in self.registry.workers(DECODE) if w.worker_id not in resume.failed]
        prefills = self._prefill_workers(resume.failed)
        try:
            route = self.router.route(decodes, prefills, prepared.prompt_token_ids + resume.token_ids)
        except ServiceError:
            raise error from None  # nowhere else to go: the original failure is the clearer message
        metrics.REQUEST_MIGRATIONS.inc()
        log.warning("request %s migrates to %s%s after %d tokens: %s", prepared.request_id, route.decode.name,
                    f" (prefill {route.prefill.name})" if route.prefill is not None else "",
                    len(resume.token_ids), error)
        return route

    def _record(self, prepared: PreparedRequest, span: trace.Span, arrival: float, tokens: _TokenTimes,
                error: BaseException | None, finish: str) -> None:
        """A request's end: metrics, its span, one log line (DEBUG, or INFO for a failure)."""
        outcome = _outcome(error) if error is not None else finish.removeprefix("FINISH_REASON_").lower() or "ok"
        elapsed = time.monotonic() - arrival
        metrics.REQUESTS.labels("gateway", outcome).inc()
        metrics.PROMPT_TOKENS.labels("gateway").inc(len(prepared.prompt_token_ids))
        metrics.GENERATION_TOKENS.labels("gateway").inc(tokens.count)
        metrics.E2E_REQUEST_LATENCY.labels("gateway").observe(elapsed)
        span.set_attributes({"moemesh.num_output_tokens": tokens.count, "moemesh.outcome": outcome})
        end_span(span, error)
        if isinstance(error, ServiceError):
            log.info("request failed after %.3f s: %s", elapsed, error)
        else:
            log.debug("request ended: %s, %d tokens in %.3f s", outcome, tokens.count, elapsed)

    def tokenize(self, req: gateway_pb2.TokenizeRequest) -> gateway_pb2.TokenizeResponse:
        """Token ids of a text (BOS when add_special_tokens) or of chat messages."""
        check_model(req.model, self.model.name)
        tokenizer = self.model.tokenizer
        which = req.WhichOneof("input")
        if which == "messages":
            ids = self.model.renderer.render(req.messages)
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
        metrics.unregister_sources(self)
        if self.pd_health is not None:
            await self.pd_health.close()
        await self.aborts.drain()
        await self.registry.close()


class Progress:
    """What the client of a request has so far (a migrated request continues after it): tokens, and characters of
    the workers' text; a request its client resumed starts from what it says it has."""

    def __init__(self, token_ids: Sequence[int] = (), text_chars: int = 0) -> None:
        self.token_ids: list[int] = list(token_ids)
        self.text_chars = text_chars
        self.migrations = 0
        self.failed: set[str] = set()  # worker ids that failed this request

    def add(self, response: gateway_pb2.GenerateResponse) -> None:
        self.token_ids.extend(response.token_ids)
        self.text_chars += len(response.text)


class _TokenTimes:
    """Time to first token and inter-token latency of one request, as its responses pass."""

    def __init__(self, arrival: float) -> None:
        self.arrival = arrival
        self.last = 0.0
        self.count = 0
        self._itl = metrics.INTER_TOKEN_LATENCY.labels("gateway")

    def observe(self, n: int) -> None:
        if not n:
            return
        now = time.monotonic()
        if self.count == 0:
            metrics.TIME_TO_FIRST_TOKEN.labels("gateway").observe(now - self.arrival)
        else:
            gap = (now - self.last) / n
            for _ in range(n):
                self._itl.observe(gap)
        self.last = now
        self.count += n


def _trace_id(span: trace.Span) -> str | None:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def _outcome(error: BaseException) -> str:
    """How a failed request ended, for `moemesh_requests_total{outcome}`: cancelled, or the status code."""
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return "cancelled"
    code = getattr(error, "code", None)
    name = getattr(code, "name", None)
    return name.lower() if isinstance(name, str) else "error"
