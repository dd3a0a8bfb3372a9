"""Telemetry: W3C context through real grpc.aio interceptors on loopback, structlog lines, the metrics
server and options, expert-load balancedness."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
import structlog
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from moemesh.service.channel import mesh_channel
from moemesh.service.config import apply_env_defaults
from moemesh.service.errors import InvalidArgument
from moemesh.service.server import GrpcServer
from moemesh.telemetry import metrics
from moemesh.telemetry.expert_load import balancedness
from moemesh.telemetry.logs import configure_logging, get_logger, request_log_context, resolve_format
from moemesh.telemetry.setup import add_telemetry_arguments
from moemesh.telemetry.tracing import configure_tracing, http_trace_context, record_span, tracer

SERVICE = "test.Echo"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """Finished spans of this process (the SDK provider, with an in-memory exporter added)."""
    configure_tracing("tests")
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        pytest.skip("the OpenTelemetry SDK is disabled (OTEL_SDK_DISABLED)")
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()  # later spans are dropped, not kept in memory


def _hex(n: int, width: int) -> str:
    return format(n, f"0{width}x")


def _echo(server: GrpcServer, hop_to: str | None = None) -> None:
    """Unary `Echo` (b"fail" raises INVALID_ARGUMENT; with `hop_to`, `Hop` calls the next server's Echo)
    and server-streaming `Stream`, on raw bytes."""

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request == b"fail":
            raise InvalidArgument("bad request")
        return request

    async def hop(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async with mesh_channel(hop_to) as channel:
            return await channel.unary_unary(f"/{SERVICE}/Echo")(request, timeout=5)

    async def stream(request: bytes, context: grpc.aio.ServicerContext):
        for _ in range(3):
            yield request

    handlers = {"Echo": grpc.unary_unary_rpc_method_handler(echo),
                "Stream": grpc.unary_stream_rpc_method_handler(stream)}
    if hop_to:
        handlers["Hop"] = grpc.unary_unary_rpc_method_handler(hop)
    generic = grpc.method_handlers_generic_handler(SERVICE, handlers)
    server.add(lambda _, s: s.add_generic_rpc_handlers((generic,)), None, SERVICE)


def test_trace_context_crosses_two_hops_and_streams(spans: InMemorySpanExporter) -> None:
    async def run() -> int:
        back = GrpcServer("127.0.0.1", 0)
        _echo(back)
        await back.start()
        front = GrpcServer("127.0.0.1", 0)
        _echo(front, hop_to=back.address)
        await front.start()
        try:
            async with mesh_channel(front.address) as channel:
                with tracer.start_as_current_span("client") as root:
                    assert await channel.unary_unary(f"/{SERVICE}/Hop")(b"hi", timeout=5) == b"hi"
                    got = [m async for m in channel.unary_stream(f"/{SERVICE}/Stream")(b"s", timeout=5)]
                    assert got == [b"s"] * 3
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await channel.unary_unary(f"/{SERVICE}/Echo")(b"fail", timeout=5)
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    health = health_pb2_grpc.HealthStub(channel)
                    await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                return root.get_span_context().trace_id
        finally:
            await front.stop(0)
            await back.stop(0)

    trace_id = asyncio.run(run())
    mine = [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]
    by_name = {s.name: s for s in mine}
    root = by_name["client"]
    hop, stream = by_name[f"{SERVICE}/Hop"], by_name[f"{SERVICE}/Stream"]
    echoes = [s for s in mine if s.name == f"{SERVICE}/Echo"]
    assert hop.kind == SpanKind.SERVER and hop.parent.span_id == root.context.span_id
    assert stream.parent.span_id == root.context.span_id
    assert stream.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    # The back server's span is a child of the front server's: the hop carried the context on.
    inner = next(s for s in echoes if s.parent.span_id == hop.context.span_id)
    assert inner.attributes["rpc.service"] == SERVICE and inner.attributes["rpc.method"] == "Echo"
    failed = next(s for s in echoes if s is not inner)
    assert failed.status.status_code == StatusCode.ERROR and "INVALID_ARGUMENT" in failed.status.description
    assert failed.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert not any("Health" in s.name for s in mine), "health checks are not traced"


def test_server_takes_traceparent_from_plain_metadata(spans: InMemorySpanExporter) -> None:
    async def run() -> None:
        server = GrpcServer("127.0.0.1", 0)
        _echo(server)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:  # no interceptor
                md = (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)
                await channel.unary_unary(f"/{SERVICE}/Echo")(b"x", metadata=md, timeout=5)
        finally:
            await server.stop(0)

    asyncio.run(run())
    span = next(s for s in spans.get_finished_spans() if _hex(s.context.trace_id, 32) == TRACE_ID)
    assert span.name == f"{SERVICE}/Echo" and _hex(span.parent.span_id, 16) == PARENT_ID


def test_http_traceparent_and_recorded_spans(spans: InMemorySpanExporter) -> None:
    with http_trace_context({"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}):
        outer = tracer.start_span("rest.request")
    with http_trace_context({}):  # no header: the current context stays
        assert not trace.get_current_span().get_span_context().is_valid
    assert _hex(outer.get_span_context().trace_id, 32) == TRACE_ID
    parent = trace.set_span_in_context(outer)
    timed = record_span("engine.step", 1_000_000_000, 1_250_000_000, parent, {"k": 1}, error="late")
    outer.end()
    done = {s.name: s for s in spans.get_finished_spans() if _hex(s.context.trace_id, 32) == TRACE_ID}
    assert done["engine.step"].end_time - done["engine.step"].start_time == 250_000_000
    assert done["engine.step"].parent.span_id == outer.get_span_context().span_id
    assert timed.status.status_code == StatusCode.ERROR


@pytest.fixture()
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    structlog.reset_defaults()


def test_json_lines_carry_request_id_and_trace_id(restore_logging: None, spans: InMemorySpanExporter) -> None:
    buf = io.StringIO()
    assert configure_logging("testsvc", "debug", "json", stream=buf) == "json"
    stdlib = logging.getLogger("moemesh.test")
    with tracer.start_as_current_span("request") as span, request_log_context("req-1"):
        stdlib.info("hello %s", "world")
        get_logger("moemesh.test").info("kv event", nbytes=3)
        try:
            raise ValueError("boom")
        except ValueError:
            stdlib.exception("it failed")
    stdlib.warning("outside any request")
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    trace_id = _hex(span.get_span_context().trace_id, 32)
    assert [ln["event"] for ln in lines] == ["hello world", "kv event", "it failed", "outside any request"]
    for ln in lines[:3]:
        assert ln["request_id"] == "req-1" and ln["trace_id"] == trace_id and ln["service"] == "testsvc"
        assert ln["logger"] == "moemesh.test" and "timestamp" in ln
    assert lines[0]["level"] == "info" and lines[1]["nbytes"] == 3
    assert "ValueError: boom" in lines[2]["exception"]
    assert "request_id" not in lines[3] and "trace_id" not in lines[3] and lines[3]["level"] == "warning"


def test_request_context_stays_with_its_task(restore_logging: None) -> None:
    buf = io.StringIO()
    configure_logging("testsvc", "info", "json", stream=buf)
    log = logging.getLogger("moemesh.test")

    async def request(rid: str) -> None:
        with request_log_context(rid):
            for _ in range(3):
                log.info("step of %s", rid)
                await asyncio.sleep(0)

    async def both() -> None:
        await asyncio.gather(request("a"), request("b"))

    asyncio.run(both())
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert len(lines) == 6 and all(ln["event"] == f"step of {ln['request_id']}" for ln in lines)


def test_console_format_is_readable_and_auto_picks_json_off_a_tty(restore_logging: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    configure_logging("testsvc", "info", "console", stream=buf)
    with request_log_context("req-9"):
        logging.getLogger("moemesh.test").info("readable")
    line = buf.getvalue()
    assert "readable" in line and "request_id=req-9" in line and not line.startswith("{")
    monkeypatch.delenv("MOEMESH_LOG_FORMAT", raising=False)
    assert resolve_format(None, io.StringIO()) == "json"
    monkeypatch.setenv("MOEMESH_LOG_FORMAT", "console")
    assert resolve_format(None, io.StringIO()) == "console"
    with pytest.raises(ValueError, match="log format"):
        resolve_format("xml", io.StringIO())


def test_telemetry_options_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEMESH_METRICS_PORT", "0")
    monkeypatch.setenv("MOEMESH_LOG_FORMAT", "console")
    p = argparse.ArgumentParser()
    add_telemetry_arguments(p, 9105)
    apply_env_defaults(p)
    args = p.parse_args([])
    assert (args.metrics_port, args.log_format, args.log_level) == (0, "console", "info")
    assert p.parse_args(["--metrics-port", "-1"]).metrics_port == -1


def test_metrics_server_serves_the_families_and_falls_back_from_a_taken_default_port() -> None:
    first = metrics.serve_metrics("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://{first.address}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for family in ("moemesh_time_to_first_token_seconds", "moemesh_inter_token_latency_seconds",
                       "moemesh_e2e_request_latency_seconds", "moemesh_request_queue_time_seconds",
                       "moemesh_kv_transfer_bytes_total", "moemesh_kv_transfer_latency_seconds",
                       "moemesh_kv_transfer_failures_total"):
            assert f"# TYPE {family.removesuffix('_total')}" in text, family
        with pytest.raises(OSError, match="cannot serve metrics"):
            metrics.serve_metrics("127.0.0.1", first.port)  # an explicit port must be free
        second = metrics.serve_metrics("127.0.0.1", first.port, fallback=True)  # a default one gives way
        assert second.port not in (0, first.port)
        second.stop()
    finally:
        first.stop()
    body, content_type = metrics.metrics_exposition()
    assert b"moemesh_e2e_request_latency_seconds" in body and content_type.startswith("text/plain")


def test_balancedness_over_virtual_ep_ranks() -> None:
    counts = torch.tensor([[4, 4, 4, 4], [8, 0, 0, 0], [0, 0, 0, 0]])
    assert balancedness(counts, 1).tolist() == [1.0, 1.0, 1.0]
    assert balancedness(counts, 2).tolist() == [1.0, 0.5, 1.0]
    assert balancedness(counts, 4).tolist() == [1.0, 0.25, 1.0]
    assert balancedness(torch.tensor([[3, 1, 1]]), 2).tolist() == [0.625]  # ranks hold {0, 1} and {2}
    with pytest.raises(ValueError, match="ep_size"):
        balancedness(counts, 5)


