"""The gRPC server shell every service runs in: grpc.aio, the standard health service (NOT_SERVING
until the service says it is ready, and again while draining), server reflection, one interceptor that
maps exceptions to status codes, tracing (the caller's W3C trace context from the metadata, one
SERVER span per call), explicit message size limits, and mutual TLS when the process has a TLS config
(`moemesh.service.tls`)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moemesh.service.channel import MAX_MESSAGE_BYTES, message_size_options
from moemesh.service.errors import status_of, trailing_metadata_of
from moemesh.service.heap import run_settled
from moemesh.service.tls import TlsConfig, configure_tls_from_args, process_tls
from moemesh.telemetry import readiness
from moemesh.telemetry.grpc_tracing import TracingServerInterceptor
from moemesh.telemetry.tracing import configure_tracing

log = logging.getLogger(__name__)



class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions escaping a handler to status codes: known ones to theirs, the rest to INTERNAL."""

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        if handler.request_deserializer is not None and not (handler.stream_unary or handler.stream_stream):
            # A unary request that does not parse fails in grpc's deserializer, before any handler runs
            # (UNKNOWN); a sentinel lets the wrapper answer INVALID_ARGUMENT. Streamed requests parse in
            # the handler's loop, where the exception reaches the wrapper as it is.
            handler = handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary))
        if handler.unary_stream:
            # Some servicers (grpc's own health Watch) stream with context.write from a coroutine.
            if inspect.isasyncgenfunction(handler.unary_stream):
                return handler._replace(unary_stream=_wrap_stream(handler.unary_stream))
            return handler._replace(unary_stream=_wrap_unary(handler.unary_stream))
        if handler.stream_unary:
            return handler._replace(stream_unary=_wrap_unary(handler.stream_unary))
        if handler.stream_stream:
            if inspect.isasyncgenfunction(handler.stream_stream):
                return handler._replace(stream_stream=_wrap_stream(handler.stream_stream))
            return handler._replace(stream_stream=_wrap_unary(handler.stream_stream))
        return handler


# Status details travel in HTTP/2 trailers, which peers cap (8-16 KiB): a message echoing a huge field
# would turn the real error into a metadata-size failure. Past this, details are cut.
MAX_DETAILS_CHARS = 2000


class _Undecodable:
    """What a unary request that did not parse becomes (see ErrorInterceptor)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # protobuf's DecodeError, or a message whose fields do not parse
            return _Undecodable(e)

    return parse


def _short(details: str) -> str:
    return details if len(details) <= MAX_DETAILS_CHARS else details[:MAX_DETAILS_CHARS] + "... (cut)"


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext) -> None:
    mapped = status_of(exc)
    if mapped is None:
        log.exception("unhandled error in a handler", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, _short(f"internal error: {type(exc).__name__}: {exc}"))
    code, details = mapped
    await context.abort(code, _short(details), trailing_metadata=trailing_metadata_of(exc))


async def _abort_undecodable(request: _Undecodable, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        _short(f"the request is not a valid protobuf message of this method: {request.error}"))


def _wrap_unary(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await _abort_undecodable(request, context)
        try:
            return await fn(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            await _abort_for(e, context)

    return wrapped


def _wrap_stream(fn: Callable[..., Any]) -> Callable[..., Any]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await _abort_undecodable(request, context)
        try:
            async for item in fn(request, context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            await _abort_for(e, context)

    return wrapped


class GrpcServer:
    """A grpc.aio server with health and reflection for the given services.

    `add(register_fn, servicer, service_name)` adds a servicer; `start()` binds; `set_serving(bool)`
    flips readiness for every registered service and the overall ("") health status.
    Tracing is configured for the process at `start` unless it already was (`setup_telemetry`), named
    after the first service added ("moemesh.v1.Decode" -> "decode").

    `tls`: serve mutual TLS with it (None: with the process's config, `configure_tls`, if any; else
    plain text). `interceptors` run before tracing and error mapping (e.g. the API key check, so that a
    refused call runs nothing). `max_message_bytes` bounds every message sent and received.
    """

    def __init__(self, host: str, port: int, *, tls: TlsConfig | None = None,
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        # No SO_REUSEPORT: a second server on a taken port must fail, not silently split the traffic.
        # Tracing before the error mapping: its span sees the status the mapping sets.
        self.server = grpc.aio.server(options=[*message_size_options(max_message_bytes), ("grpc.so_reuseport", 0)],
                                      interceptors=[*interceptors, TracingServerInterceptor(), ErrorInterceptor()])
        self.tls = tls
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names: list[str] = []
        self.host = host
        self.requested_port = port
        self.port = 0

    def add(self, register: Callable[[Any, grpc.aio.Server], None], servicer: Any, service_name: str) -> None:
        register(servicer, self.server)
        self.service_names.append(service_name)

    async def start(self) -> int:
        configure_tracing(_service_of(self.service_names))
        names: Iterable[str] = (*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(tuple(names), self.server)
        address = f"{self.host}:{self.requested_port}"
        tls = self.tls if self.tls is not None else process_tls()
        if tls is not None:
            self.port = self.server.add_secure_port(address, tls.server_credentials())
        else:
            self.port = self.server.add_insecure_port(address)
        self.tls = tls
        if self.port == 0:
            raise OSError(f"cannot listen on {self.host}:{self.requested_port}")
        await self.set_serving(False)
        await self.server.start()
        return self.port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)


def install_signal_handlers(stop: asyncio.Event) -> list[signal.Signals]:
    """SIGINT/SIGTERM set `stop` so the service drains and exits cleanly; returns the signals taken.

    Outside the main thread (a service started inside a test or another program) the loop cannot take
    signals: nothing is installed, and the caller's `stop` event is the only way to end the service.
    """
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            continue
        installed.append(sig)
    return installed


def remove_signal_handlers(signals: list[signal.Signals]) -> None:
    """Undo `install_signal_handlers` (a service that returns must not leave handlers on the loop)."""
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.remove_signal_handler(sig)


def _service_of(service_names: list[str]) -> str:
    """"decode" for ["moemesh.v1.Decode", ...]; "moemesh" without services."""
    return service_names[0].rsplit(".", 1)[-1].lower() if service_names else "moemesh"


def announce(service: str, address: str, kind: str = readiness.GRPC) -> None:
    """Print the readiness line launchers wait for ("SERVICE listening on ADDR"; with kind HTTP,
    "SERVICE http listening on ADDR"), in one write(2): see `moemesh.telemetry.readiness`."""
    readiness.write_line(readiness.ready_line(service, address, kind))


def run_service(serve: Callable[[Any], Awaitable[None]], args: Any, name: str) -> int:
    """The body of a service's `main`: mutual TLS (the options of `add_tls_arguments`, if any), telemetry
    (logs, tracing, the /metrics server; the options of `add_telemetry_arguments`), then `serve(args)`
    until it returns (SIGTERM, Ctrl-C)."""
    from moemesh.telemetry.setup import setup_telemetry

    try:
        configure_tls_from_args(args)
        setup_telemetry(name, args)
    except (OSError, RuntimeError, ValueError) as e:
        print(f"moemesh serve {name}: error: {e}", file=sys.stderr)
        return 2
    run_settled(serve, args)
    return 0
