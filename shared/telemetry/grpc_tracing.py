"""W3C trace context over gRPC (grpc.aio): a client interceptor that writes `traceparent` into the call's
metadata, and a server interceptor that reads it and runs the handler in a SERVER span.

    channel = grpc.aio.insecure_channel(target, interceptors=client_interceptors())  # moemesh.service.channel
    server = grpc.aio.server(interceptors=[TracingServerInterceptor(), ...])  # GrpcServer does this

The client side opens no span of its own: the caller's current span (say the gateway's request span)
is the parent of the server's span. Health checks, reflection and heartbeats are not traced (they
would flood the trace store with one-span traces).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import grpc
from opentelemetry import propagate
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from moemesh.telemetry.tracing import tracer

TRACEPARENT = "traceparent"

# Methods (full "/package.Service/Method" names, or prefixes ending in "/" or ".") left untraced.
DEFAULT_UNTRACED: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
    "/moemesh.v1.WorkerRegistry/Heartbeat",
)


# ---- client --------------------------------------------------------------------------------------

def _with_trace_context(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return details
    metadata = list(details.metadata or ())
    if any(key == TRACEPARENT for key, _ in metadata):
        return details  # the caller set its own
    metadata.extend(carrier.items())
    return details._replace(metadata=grpc.aio.Metadata(*metadata))


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Callable[..., Any], client_call_details: Any,
                                    request: Any) -> Any:
        return await continuation(_with_trace_context(client_call_details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Callable[..., Any], client_call_details: Any,
                                     request: Any) -> Any:
        return await continuation(_with_trace_context(client_call_details), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Callable[..., Any], client_call_details: Any,
                                     request_iterator: Any) -> Any:
        return await continuation(_with_trace_context(client_call_details), request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Callable[..., Any], client_call_details: Any,
                                      request_iterator: Any) -> Any:
        return await continuation(_with_trace_context(client_call_details), request_iterator)


# A channel files each interceptor under the first call type it implements: one object per type.
_CLIENT_INTERCEPTORS: tuple[grpc.aio.ClientInterceptor, ...] = (_UnaryUnary(), _UnaryStream(), _StreamUnary(),
                                                                _StreamStream())


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """The interceptors that add the current trace context (`traceparent`, `tracestate`) to every call's
    metadata, one per call type. grpc.aio runs them in a task made when the call is created, so the
    context current at the stub call is the one sent."""
    return list(_CLIENT_INTERCEPTORS)


# ---- server --------------------------------------------------------------------------------------

class TracingServerInterceptor(grpc.aio.ServerInterceptor):
    """Runs every handler in a SERVER span named `package.Service/Method`, child of the caller's context.

    The span is current while the handler runs (its own spans, logs and outgoing calls join the trace)
    and ends with the call's status code. Put it first in the server's interceptors so that it sees
    the status the inner ones (the error mapping) set.
    """

    def __init__(self, untraced: Collection[str] = DEFAULT_UNTRACED) -> None:
        self.untraced = tuple(untraced)

    def traced(self, method: str) -> bool:
        return not any(method == u or (u.endswith(("/", ".")) and method.startswith(u)) for u in self.untraced)

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or not self.traced(details.method):
            return handler
        metadata = details.invocation_metadata or ()
        carrier = {key: value for key, value in metadata if isinstance(value, str)}
        full = details.method.lstrip("/")
        service, _, method = full.partition("/")
        attrs = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        span = _SpanFactory(full, carrier, attrs)
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary, span))
        if handler.unary_stream:
            if inspect.isasyncgenfunction(handler.unary_stream):
                return handler._replace(unary_stream=_wrap_stream(handler.unary_stream, span))
            return handler._replace(unary_stream=_wrap_unary(handler.unary_stream, span))
        if handler.stream_unary:
            return handler._replace(stream_unary=_wrap_unary(handler.stream_unary, span))
        if handler.stream_stream:
            if inspect.isasyncgenfunction(handler.stream_stream):
                return handler._replace(stream_stream=_wrap_stream(handler.stream_stream, span))
            return handler._replace(stream_stream=_wrap_unary(handler.stream_stream, span))
        return handler


class _SpanFactory:
    """What a call's span needs, gathered when the call arrives; the span starts when the handler runs."""

    def __init__(self, name: str, carrier: dict[str, str], attributes: dict[str, str]) -> None:
        self.name = name
        self.carrier = carrier
        self.attributes = attributes

    def start(self) -> Any:
        parent = propagate.extract(self.carrier) if TRACEPARENT in self.carrier else None
        return tracer.start_as_current_span(self.name, context=parent, kind=SpanKind.SERVER,
                                            attributes=self.attributes, record_exception=False,
                                            set_status_on_exception=False)


def _finish(span: Span, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.CANCELLED.value[0])
        return
    code = context.code()
    if isinstance(code, int):  # grpc.aio keeps the integer when a handler sets one
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if code is None:
        code = grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        details = context.details() or (f"{type(error).__name__}: {error}" if error is not None else "")
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"))


def _wrap_unary(fn: Callable[..., Awaitable[Any]], factory: _SpanFactory) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        with factory.start() as span:
            try:
                result = await fn(request, context)
            except BaseException as e:
                _finish(span, context, e)
                raise
            _finish(span, context, None)
            return result

    return wrapped


def _wrap_stream(fn: Callable[..., AsyncIterator[Any]], factory: _SpanFactory) -> Callable[..., AsyncIterator[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        with factory.start() as span:
            try:
                async for item in fn(request, context):
                    yield item
            except BaseException as e:
                _finish(span, context, e)
                raise
            _finish(span, context, None)

    return wrapped
