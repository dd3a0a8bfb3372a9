"""OpenTelemetry tracing: one tracer provider per process, configured from the standard OTEL_* variables.

- `configure_tracing(service)` installs the SDK's tracer provider once per process (the first call
  wins; `GrpcServer.start` calls it too, so every service is covered). Spans are exported over OTLP
  only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, through a
  batch processor (`OTEL_BSP_*`); otherwise no exporter exists and a span costs a few microseconds
  (ids are still made, so logs carry a `trace_id` and the context still crosses services).
  `OTEL_SERVICE_NAME` overrides the default `moemesh-<service>`; `OTEL_TRACES_SAMPLER` /
  `OTEL_TRACES_SAMPLER_ARG` choose the sampler (default parent-based always-on);
  `OTEL_TRACES_EXPORTER=console` prints spans, `none` exports nothing; `OTEL_SDK_DISABLED=true`
  leaves the no-op API in place.
- `record_span` makes a span from monotonic timestamps taken elsewhere (the engine thread records
  times on its requests; the asyncio side turns them into spans afterwards).
- `http_trace_context(headers)` makes an incoming HTTP `traceparent` the parent of what runs inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

log = logging.getLogger(__name__)

TRACER_NAME = "moemesh"
# A proxy: it follows whichever provider is installed, before or after this module is imported.
tracer = trace.get_tracer(TRACER_NAME)

_service: str | None = None
_provider: Any = None


def default_service_name(service: str) -> str:
    """The `service.name` resource attribute of a service when OTEL_SERVICE_NAME is not set."""
    return service if service.startswith("moemesh") else f"moemesh-{service}"


def configure_tracing(service: str, environ: Mapping[str, str] | None = None) -> bool:
    """Install this process's tracer provider (once; later calls return at once); True when installed.

    Raises RuntimeError when the environment asks for an exporter whose package is missing.
    """
    global _service, _provider
    if _service is not None:
        return _provider is not None
    env = os.environ if environ is None else environ
    _service = service
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create({})  # the SDK's attributes plus OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME
    if str(resource.attributes.get(SERVICE_NAME, "unknown_service")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: default_service_name(service)}))
    # The sampler comes from OTEL_TRACES_SAMPLER(_ARG); the default is parentbased_always_on.
    provider = TracerProvider(resource=resource)
    for name, exporter in _exporters(env):
        processor = SimpleSpanProcessor(exporter) if name == "console" else BatchSpanProcessor(exporter)
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    _provider = provider
    return True


def _exporters(env: Mapping[str, str]) -> list[tuple[str, Any]]:
    """The exporters OTEL_TRACES_EXPORTER names (default otlp, which needs an endpoint to be set)."""
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    out: list[tuple[str, Any]] = []
    for name in names:
        if name == "none":
            return []
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            out.append((name, ConsoleSpanExporter()))
        elif name == "otlp":
            if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
                out.append((name, _otlp_exporter(env)))
        else:
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported here (otlp, console, none); ignored", name)
    return out


def _otlp_exporter(env: Mapping[str, str]) -> Any:
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc").strip().lower()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
        except ImportError as e:
            raise RuntimeError(
                "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf needs the package opentelemetry-exporter-otlp-proto-http "
                "(pip install opentelemetry-exporter-otlp-proto-http); or set it to grpc") from e
        return HttpExporter()
    raise RuntimeError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use grpc or http/protobuf")


def shutdown_tracing() -> None:
    """Flush and stop the exporters (also done at interpreter exit)."""
    if _provider is not None:
        _provider.shutdown()


# ---- context -------------------------------------------------------------------------------------

def current_trace_id() -> str:
    """The current span's trace id as 32 hex digits, "" outside any trace."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def trace_id_of(span: Span) -> str:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


@contextlib.contextmanager
def attached(ctx: otel_context.Context | None) -> Iterator[None]:
    """Make `ctx` current for a block that does not yield to other tasks between enter and exit.

    (Calls made inside, e.g. a grpc.aio stub call that starts its interceptors in a new task, copy it.)
    """
    if ctx is None:
        yield
        return
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


def context_from_headers(headers: Mapping[str, str]) -> otel_context.Context:
    """The context an incoming HTTP request's `traceparent` / `tracestate` headers carry (the current
    one when they carry none). `headers` may be any mapping; Starlette's case-insensitive one works."""
    return propagate.extract(headers)


@contextlib.contextmanager
def http_trace_context(headers: Mapping[str, str]) -> Iterator[None]:
    """Run a block under the trace an HTTP request's `traceparent` names (nothing changes without one).

    For the REST facade: `with http_trace_context(request.headers): stream = core.open(req, timeout)`.
    GatewayCore.open starts the request's span there, as a child of the caller's span.
    """
    if "traceparent" not in headers:
        yield
        return
    with attached(context_from_headers(headers)):
        yield


def inject_into(carrier: dict[str, str]) -> dict[str, str]:
    """Write the current context's `traceparent` (and `tracestate`, baggage) into `carrier`."""
    propagate.inject(carrier)
    return carrier


# ---- spans from recorded times -------------------------------------------------------------------

def epoch_ns(monotonic_ns: int) -> int:
    """A `time.monotonic_ns()` reading as nanoseconds since the epoch (what span times are)."""
    return monotonic_ns + (time.time_ns() - time.monotonic_ns())


def record_span(name: str, start_ns: int, end_ns: int, parent: otel_context.Context | None = None,
                attributes: Mapping[str, Any] | None = None, error: str | None = None,
                kind: SpanKind = SpanKind.INTERNAL, offset_ns: int | None = None) -> Span:
    """A finished span between two `time.monotonic_ns()` readings, child of `parent` (default: current).

    `offset_ns`: epoch minus monotonic time; pass one value to all spans of a request so that spans
    sharing a timestamp share it exactly (default: read now).
    """
    offset = time.time_ns() - time.monotonic_ns() if offset_ns is None else offset_ns
    span = tracer.start_span(name, context=parent, kind=kind, attributes=attributes,
                             start_time=start_ns + offset)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=max(end_ns, start_ns) + offset)
    return span


def end_span(span: Span, error: BaseException | str | None = None) -> None:
    """End `span`, marked as failed when `error` is given (a cancellation is noted, not an error)."""
    if isinstance(error, (GeneratorExit, asyncio.CancelledError)):
        span.set_attribute("moemesh.cancelled", True)
    elif isinstance(error, BaseException):
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    elif error:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()
