"""Telemetry of the real services in-process: a decode worker's metrics families move and its engine
timestamps become spans; kvtransfer's rendezvous and transfer; the gateway's request span, metrics and
the trace context it sends to the workers (from gRPC, and from an HTTP `traceparent`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from moemesh.engine.engine import Engine, EngineConfig
from moemesh.engine.sampling_params import SamplingParams
from moemesh.service.channel import mesh_channel
from moemesh.service.version import PROTOCOL_VERSION
from moemesh.services.decode import serve as decode_serve
from moemesh.services.kvtransfer.config import KvTransferConfig
from moemesh.services.kvtransfer.service import KvTransferService
from moemesh.telemetry.tracing import configure_tracing, http_trace_context, tracer
from moemesh.v1 import common_pb2, decode_pb2, decode_pb2_grpc, gateway_pb2, kvtransfer_pb2
from moemesh.v1 import kvtransfer_pb2_grpc as kv_grpc
from tests.net import free_port
from tests.service.gateway.doubles import FakeDecode, FakePrefill, Mesh, make_tokenizer_dir

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    configure_tracing("tests")
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        pytest.skip("the OpenTelemetry SDK is disabled (OTEL_SDK_DISABLED)")
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def family(name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of one family now: {sorted label pairs: value}."""
    for metric in REGISTRY.collect():
        if metric.name == name:
            return {tuple(sorted(s.labels.items())): s.value for s in metric.samples}
    raise AssertionError(f"no family {name}")


def _in_trace(exporter: InMemorySpanExporter, trace_id: int) -> dict[str, Any]:
    return {s.name: s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id}


def test_decode_worker_metrics_move_and_engine_times_become_spans(small_dir: Path,
                                                                   spans: InMemorySpanExporter) -> None:
    port = free_port()
    args = decode_serve.build_parser().parse_args(
        ["--port", str(port), "--gateway", "", "--transfer", "inproc", "--model", str(small_dir), "--kv-cache-mb", "8"])
    hist = ("moemesh_time_to_first_token_seconds_count", "moemesh_e2e_request_latency_seconds_count",
            "moemesh_request_queue_time_seconds_count", "moemesh_inter_token_latency_seconds_count")
    before = {name: sample(name, role="decode") for name in hist}
    tokens_before = sample("moemesh_generation_tokens_total", role="decode")
    done_before = sample("moemesh_requests_total", role="decode", outcome="length")

    async def run() -> tuple[int, dict, dict]:
        ready, stop = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(decode_serve.serve(args, ready, stop))
        await asyncio.wait_for(ready.wait(), 60)
        try:
            async with mesh_channel(f"127.0.0.1:{port}") as ch:
                req = decode_pb2.DecodeRequest(request_id="telemetry-1", prompt_token_ids=[0, 5, 6, 7, 8, 9],
                                               sampling=common_pb2.SamplingParams(max_tokens=5, temperature=0,
                                                                                  ignore_eos=True))
                with tracer.start_as_current_span("client") as root:
                    out = [t async for r in decode_pb2_grpc.DecodeStub(ch).Generate(req, timeout=30)
                           for t in r.token_ids]
                assert len(out) == 5
            # Gauges are read at scrape time from the running worker.
            return root.get_span_context().trace_id, family("moemesh_kv_pages_free"), \
                family("moemesh_expert_load_balancedness")
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    trace_id, pages_free, balance = asyncio.run(run())
    for name in hist[:3]:
        assert sample(name, role="decode") == before[name] + 1, name
    assert sample(hist[3], role="decode") == before[hist[3]] + 4  # 5 tokens, 4 gaps
    assert sample("moemesh_generation_tokens_total", role="decode") == tokens_before + 5
    assert sample("moemesh_requests_total", role="decode", outcome="length") == done_before + 1
    assert pages_free[(("role", "decode"),)] > 0
    layers = {dict(k)["layer"]: v for k, v in balance.items() if dict(k)["role"] == "decode"}
    assert layers and all(v == 1.0 for v in layers.values())  # one EP rank: balanced by definition
    # The worker stopped: it no longer reports its state.
    assert (("role", "decode"),) not in family("moemesh_num_requests_running")

    got = _in_trace(spans, trace_id)
    server = got["moemesh.v1.Decode/Generate"]
    assert server.parent.span_id == got["client"].context.span_id
    first = got["decode.first_token"]
    assert first.parent.span_id == server.context.span_id
    for child in ("decode.queue_wait", "decode.prefill"):
        assert got[child].parent.span_id == first.context.span_id, child
    assert got["decode.queue_wait"].end_time <= got["decode.prefill"].start_time + 1
    decode = got["decode.decode"]
    assert decode.start_time == first.end_time and decode.end_time <= server.end_time
    assert decode.attributes["moemesh.num_output_tokens"] == 5
    assert decode.attributes["moemesh.request_id"] == "telemetry-1"


def test_expert_load_recorder_counts_every_routed_token(small_dir: Path) -> None:
    engine = Engine(EngineConfig(model=str(small_dir), kv_cache_mb=8))
    rec = engine.expert_load
    assert rec is not None and rec.layers
    prompts = [[0, 5, 6, 7, 8, 9, 10], [0, 11, 12]]
    engine.generate(prompts, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    rec.maybe_readout(force=True)
    top_k = engine.model.config.num_experts_per_tok
    fed = sum(len(p) for p in prompts) + 2 * 2  # prompts, then 2 decode steps each (the 3rd token is sampled only)
    assert rec.snapshot.sum(-1).tolist() == [fed * top_k] * len(rec.layers)
    assert all(v == 1.0 for _, v in rec.balancedness(1))
    spread = [v for _, v in rec.balancedness(rec.num_experts)]
    assert all(0 < v <= 1 for v in spread)


def test_kvtransfer_rendezvous_and_transfer_spans_and_metrics(spans: InMemorySpanExporter) -> None:
    layout = common_pb2.KvLayout(model_fingerprint="fp", num_layers=2, page_size_tokens=16, kv_lora_rank=32,
                                 qk_rope_head_dim=16, dtype=common_pb2.KV_DTYPE_BFLOAT16)
    bytes_before = sample("moemesh_kv_transfer_bytes_total", side="room", plane="relay")
    latency_before = sample("moemesh_kv_transfer_latency_seconds_count", side="room", plane="relay")
    failed_before = sample("moemesh_kv_transfer_failures_total", side="room", plane="relay")

    async def run() -> int:
        svc = KvTransferService(KvTransferConfig(port=0, drain_s=0.0, shutdown_grace_s=0.5))
        await svc.start()
        try:
            async with mesh_channel(svc.address) as ch:
                stub = kv_grpc.KvTransferStub(ch)
                with tracer.start_as_current_span("prefill side") as root:
                    for room in ("room-ok", "room-bad"):
                        await stub.RegisterReceiver(kvtransfer_pb2.RegisterReceiverRequest(
                            protocol_version=PROTOCOL_VERSION, room_id=room, layout=layout,
                            data_plane=kvtransfer_pb2.DATA_PLANE_RELAY, num_tokens=8), timeout=5)
                        await stub.ResolveReceiver(kvtransfer_pb2.ResolveReceiverRequest(
                            protocol_version=PROTOCOL_VERSION, room_id=room, layout=layout, wait_ms=1000), timeout=5)
                    await stub.ReportTransfer(kvtransfer_pb2.ReportTransferRequest(
                        room_id="room-ok", state=kvtransfer_pb2.ROOM_STATE_SUCCESS, bytes=4096), timeout=5)
                    await stub.ReportTransfer(kvtransfer_pb2.ReportTransferRequest(
                        room_id="room-bad", state=kvtransfer_pb2.ROOM_STATE_FAILED, error="gone"), timeout=5)
                return root.get_span_context().trace_id
        finally:
            await svc.stop()

    trace_id = asyncio.run(run())
    assert sample("moemesh_kv_transfer_bytes_total", side="room", plane="relay") == bytes_before + 4096
    assert sample("moemesh_kv_transfer_latency_seconds_count", side="room", plane="relay") == latency_before + 1
    assert sample("moemesh_kv_transfer_failures_total", side="room", plane="relay") == failed_before + 1
    mine = [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]
    resolves = {s.context.span_id: s for s in mine if s.name == "moemesh.v1.KvTransfer/ResolveReceiver"}
    rendezvous = [s for s in mine if s.name == "kvtransfer.rendezvous"]
    transfers = {s.attributes["moemesh.room_id"]: s for s in mine if s.name == "kvtransfer.transfer"}
    assert len(resolves) == 2 and all(s.parent.span_id in resolves for s in rendezvous) and len(rendezvous) == 2
    assert transfers["room-ok"].parent.span_id in resolves and transfers["room-ok"].status.is_ok
    assert transfers["room-ok"].attributes["moemesh.kv_bytes"] == 4096
    assert not transfers["room-bad"].status.is_ok


class _RecordingDecode(FakeDecode):
    """A fake decode worker that also keeps each call's `traceparent`."""

    def __init__(self) -> None:
        super().__init__()
        self.traceparents: list[str] = []

    async def Generate(self, request: decode_pb2.DecodeRequest, context: grpc.aio.ServicerContext) -> Any:
        self.traceparents.append(dict(context.invocation_metadata() or ()).get("traceparent", ""))
        async for resp in super().Generate(request, context):
            yield resp


def test_gateway_request_span_metrics_and_trace_context_to_workers(tmp_path: Path,
                                                                    spans: InMemorySpanExporter) -> None:
    model_dir = make_tokenizer_dir(tmp_path / "tok")
    ttft = sample("moemesh_time_to_first_token_seconds_count", role="gateway")
    itl = sample("moemesh_inter_token_latency_seconds_count", role="gateway")
    e2e = sample("moemesh_e2e_request_latency_seconds_count", role="gateway")

    async def run() -> tuple[list[str], float]:
        async with Mesh(model_dir) as mesh:
            decode = _RecordingDecode()
            await mesh.add(decode, "d1")
            await mesh.add(FakePrefill(), "p1")
            out = await mesh.generate(prompt="hello", sampling=common_pb2.SamplingParams(max_tokens=4))
            assert len(out) == 4
            # The REST facade's way: an HTTP traceparent made current around core.open().
            with http_trace_context({"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}):
                stream = mesh.app.core.open(gateway_pb2.GenerateRequest(
                    prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=2)))
            assert len([r async for r in stream]) == 2
            running = family("moemesh_num_requests_running")[(("role", "gateway"),)]
            return decode.traceparents, running

    traceparents, running = asyncio.run(run())
    assert running == 0
    assert sample("moemesh_time_to_first_token_seconds_count", role="gateway") == ttft + 2
    assert sample("moemesh_inter_token_latency_seconds_count", role="gateway") == itl + 3 + 1
    assert sample("moemesh_e2e_request_latency_seconds_count", role="gateway") == e2e + 2
    grpc_tp, http_tp = traceparents
    _, trace_hex, parent_hex, _ = grpc_tp.split("-")
    got = _in_trace(spans, int(trace_hex, 16))
    request = got["gateway.generate"]
    assert format(request.context.span_id, "016x") == parent_hex  # the workers' parent is the request span
    assert request.parent.span_id == got["moemesh.v1.Gateway/Generate"].context.span_id
    for child in ("gateway.tokenize", "gateway.route"):
        assert got[child].parent.span_id == request.context.span_id
    assert request.attributes["moemesh.num_output_tokens"] == 4 and request.attributes["moemesh.outcome"] == "length"
    assert http_tp.split("-")[1] == TRACE_ID
    from_http = _in_trace(spans, int(TRACE_ID, 16))["gateway.generate"]
    assert format(from_http.parent.span_id, "016x") == PARENT_ID
