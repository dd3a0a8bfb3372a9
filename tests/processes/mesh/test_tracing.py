"""Telemetry of the real mesh (`moemesh up`, one process per service): one trace per request across
gateway, prefill, kvtransfer and decode, exported over OTLP to a collector on loopback; every
service's `/metrics` under traffic."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from moemesh.sdk import MeshClient
from moemesh.telemetry.readiness import METRICS, parse_line
from moemesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.processes.mesh.launch import RunningMesh, start_mesh

SERVICES = {"moemesh-gateway", "moemesh-prefill", "moemesh-kvtransfer", "moemesh-decode"}
# Span name -> the service that must have made it.
NAMED_SPANS = {
    "moemesh.v1.Gateway/Generate": "moemesh-gateway",
    "gateway.generate": "moemesh-gateway",
    "moemesh.v1.Prefill/PrefillStream": "moemesh-prefill",
    "prefill.queue_wait": "moemesh-prefill",
    "prefill.forward": "moemesh-prefill",
    "prefill.kv_send": "moemesh-prefill",
    "kvtransfer.rendezvous": "moemesh-kvtransfer",
    "kvtransfer.transfer": "moemesh-kvtransfer",
    "moemesh.v1.KvTransfer/PushChunks": "moemesh-kvtransfer",
    "moemesh.v1.Decode/Generate": "moemesh-decode",
    "decode.queue_wait": "moemesh-decode",
    "decode.kv_transfer": "moemesh-decode",
    "decode.first_token": "moemesh-decode",
    "decode.decode": "moemesh-decode",
}
TRACE_ID = "5b8efff798038103d269b633813fc60c"
PARENT_ID = "eee19b7ec3c1b174"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver: keeps (service.name, span) of everything exported to it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[tuple[str, object]] = []

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
               ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.lock:
            for rs in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    self.spans.extend((attrs.get("service.name", ""), span) for span in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: bytes) -> list[tuple[str, object]]:
        with self.lock:
            return [(svc, s) for svc, s in self.spans if s.trace_id == trace_id]

    def wait_for(self, trace_id: bytes, names: set[str], timeout_s: float = 30) -> list[tuple[str, object]]:
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.trace(trace_id)
            missing = names - {s.name for _, s in got}
            if not missing:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"spans missing from trace {trace_id.hex()}: {sorted(missing)}; "
                                     f"have {sorted({(svc, s.name) for svc, s in got})}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Collector, int]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    received = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(received, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield received, port
    server.stop(0)


@pytest.fixture(scope="module")
def mesh(collector: tuple[Collector, int]) -> Iterator[RunningMesh]:
    _, port = collector
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
           "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_TRACES_SAMPLER": "parentbased_always_on",
           "MOEMESH_LOG_FORMAT": "json",
           # Several services on one host: every /metrics on a free port (each logs where).
           "MOEMESH_METRICS_PORT": "0"}
    running = start_mesh("--prefill", "1", "--decode", "1", "--transfer", "relay", env=env)
    try:
        yield running
    finally:
        running.stop()


def _by_name(spans: list[tuple[str, object]]) -> dict[str, tuple[str, object]]:
    return {s.name: (svc, s) for svc, s in spans}


def test_one_trace_spans_gateway_prefill_kvtransfer_and_decode(mesh: RunningMesh,
                                                                collector: tuple[Collector, int]) -> None:
    received, _ = collector
    with MeshClient(mesh.gateway, timeout_s=120) as client:
        done = client.generate(prompt="Trace this request through the mesh", max_tokens=6, temperature=0,
                               ignore_eos=True)
    assert len(done.token_ids) == 6
    # The request's span names its id; its trace is the one to check.
    deadline = time.monotonic() + 30
    root = None
    while root is None:
        with received.lock:
            root = next((s for svc, s in received.spans if s.name == "gateway.generate" and any(
                a.key == "moemesh.request_id" and a.value.string_value == done.request_id for a in s.attributes)),
                None)
        assert root is not None or time.monotonic() < deadline, "the gateway exported no span for the request"
        time.sleep(0.1)
    spans = received.wait_for(root.trace_id, set(NAMED_SPANS))
    assert {svc for svc, _ in spans} == SERVICES
    named = _by_name(spans)
    for name, service in NAMED_SPANS.items():
        assert named[name][0] == service, (name, named[name][0])
    # The workers' calls are children of the gateway's request span, the engine's spans of the calls.
    request = named["gateway.generate"][1]
    assert named["moemesh.v1.Prefill/PrefillStream"][1].parent_span_id == request.span_id
    assert named["moemesh.v1.Decode/Generate"][1].parent_span_id == request.span_id
    assert named["prefill.forward"][1].parent_span_id == named["moemesh.v1.Prefill/PrefillStream"][1].span_id
    assert named["decode.first_token"][1].parent_span_id == named["moemesh.v1.Decode/Generate"][1].span_id
    assert len({s.trace_id for _, s in spans}) == 1


def test_incoming_traceparent_is_the_parent_of_the_request(mesh: RunningMesh,
                                                           collector: tuple[Collector, int]) -> None:
    received, _ = collector
    with grpc.insecure_channel(mesh.gateway) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).Generate(
            gateway_pb2.GenerateRequest(prompt="Hi", sampling=common_pb2.SamplingParams(max_tokens=3)),
            metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),), timeout=120)
        assert sum(len(r.token_ids) for r in call) == 3
    spans = received.wait_for(bytes.fromhex(TRACE_ID), {"moemesh.v1.Gateway/Generate", "decode.decode",
                                                         "prefill.forward", "kvtransfer.transfer"})
    server = _by_name(spans)["moemesh.v1.Gateway/Generate"][1]
    assert server.parent_span_id.hex() == PARENT_ID
    assert {svc for svc, _ in spans} == SERVICES


def _metrics_addresses(mesh: RunningMesh) -> dict[str, str]:
    """service -> host:port of its /metrics, from the `NAME metrics on HOST:PORT` log line each service
    writes to stderr (stdout, which `moemesh up` reads, is not passed on)."""
    out = {}
    for line in list(mesh.output):
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        ready = parse_line(str(event.get("event", "")))
        if ready is not None and ready.kind == METRICS:
            out[ready.service] = ready.address
    return out


def _scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_every_worker_service_serves_metrics_that_move_under_traffic(mesh: RunningMesh) -> None:
    addresses = _metrics_addresses(mesh)
    assert {"kvtransfer", "eplb", "prefill", "decode"} <= set(addresses), addresses
    before = {name: _scrape(addresses[name]) for name in ("prefill", "decode", "kvtransfer")}
    with MeshClient(mesh.gateway, timeout_s=120) as client:
        for prompt in ("metrics one", "metrics two"):
            assert len(client.generate(prompt=prompt, max_tokens=4, temperature=0, ignore_eos=True).token_ids) == 4
    after = {name: _scrape(addresses[name]) for name in ("prefill", "decode", "kvtransfer")}

    def moved(service: str, name: str, **labels: str) -> float:
        return _value(after[service], name, **labels) - _value(before[service], name, **labels)

    for name in ("moemesh_time_to_first_token_seconds_count", "moemesh_e2e_request_latency_seconds_count",
                 "moemesh_request_queue_time_seconds_count"):
        assert moved("decode", name, role="decode") == 2, name
        assert moved("prefill", name, role="prefill") == 2, name
    assert moved("decode", "moemesh_inter_token_latency_seconds_count", role="decode") == 6
    assert moved("decode", "moemesh_kv_transfer_bytes_total", side="receiver", plane="relay") > 0
    assert moved("prefill", "moemesh_kv_transfer_bytes_total", side="sender", plane="relay") > 0
    assert moved("prefill", "moemesh_kv_transfer_latency_seconds_count", side="sender", plane="relay") == 2
    assert moved("kvtransfer", "moemesh_kv_transfer_bytes_total", side="room", plane="relay") > 0
    assert moved("kvtransfer", "moemesh_kv_transfer_bytes_total", side="relay", plane="relay") > 0
    assert moved("kvtransfer", "moemesh_kv_transfer_latency_seconds_count", side="room", plane="relay") == 2
    for role in ("prefill", "decode"):
        samples = after[role]
        assert _value(samples, "moemesh_kv_pages_free", role=role) > 0
        assert ("moemesh_num_requests_running", (("role", role),)) in samples
        assert ("moemesh_num_requests_waiting", (("role", role),)) in samples
        assert ("moemesh_kv_pages_used", (("role", role),)) in samples
        assert ("moemesh_prefix_cache_hit_rate", (("role", role),)) in samples
        balance = [v for (name, labels), v in samples.items() if name == "moemesh_expert_load_balancedness"]
        assert balance and all(v == 1.0 for v in balance)  # EP size 1
    eplb = _scrape(addresses["eplb"])
    assert any(name.startswith("process_") for name, _ in eplb)


def test_gateway_serves_metrics_that_move_under_traffic(mesh: RunningMesh) -> None:
    """Needs `setup_telemetry("gateway", ...)` in the gateway's process entry (services/gateway/serve.py)."""
    addresses = _metrics_addresses(mesh)
    assert "gateway" in addresses, f"the gateway serves no /metrics (not wired in its serve.py?): {addresses}"
    before = _scrape(addresses["gateway"])
    with MeshClient(mesh.gateway, timeout_s=120) as client:
        assert len(client.generate(prompt="gateway metrics", max_tokens=4, temperature=0,
                                   ignore_eos=True).token_ids) == 4
    after = _scrape(addresses["gateway"])
    for name, n in (("moemesh_time_to_first_token_seconds_count", 1), ("moemesh_e2e_request_latency_seconds_count", 1),
                    ("moemesh_inter_token_latency_seconds_count", 3)):
        assert _value(after, name, role="gateway") - _value(before, name, role="gateway") == n, name
    assert ("moemesh_num_requests_running", (("role", "gateway"),)) in after
