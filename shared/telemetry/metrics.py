"""The `moemesh_*` Prometheus families (named after vLLM's and SGLang's where one exists) and `/metrics`.

Histograms and counters are observed where a request ends or a transfer completes, never per step of
the engine. Gauges of engine state (running, waiting, KV pages, prefix-cache hit rate, expert load
balancedness) are read when Prometheus scrapes, from the sources a service registers:

    register_load_source("decode", async_engine, lambda e: e.load)         # a dict of numbers
    register_expert_source("decode", async_engine, lambda e: [(layer, value), ...])
    unregister_sources(async_engine)

Labels: `role` is the service or worker role (gateway, prefill, decode); KV transfer families take
`side` (sender, receiver on the workers; room, relay on kvtransfer) and `plane` (relay, ucx, inproc).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from moemesh.telemetry import readiness

log = logging.getLogger(__name__)

# Every service's default /metrics port; 0 picks a free one, -1 serves none.
DEFAULT_METRICS_PORTS = {"gateway": 9101, "kvtransfer": 9102, "eplb": 9103, "prefill": 9104, "decode": 9105}

# `_created` series double the exposition for no use here.
prometheus_client.disable_created_metrics()

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                     60.0)

TIME_TO_FIRST_TOKEN = Histogram(
    "moemesh_time_to_first_token_seconds", "Time from a request's arrival to its first output token.",
    ["role"], buckets=_LATENCY_BUCKETS)
INTER_TOKEN_LATENCY = Histogram(
    "moemesh_inter_token_latency_seconds", "Time between two consecutive output tokens of a request.",
    ["role"], buckets=_ITL_BUCKETS)
E2E_REQUEST_LATENCY = Histogram(
    "moemesh_e2e_request_latency_seconds", "Time from a request's arrival to its end.",
    ["role"], buckets=_E2E_BUCKETS)
REQUEST_QUEUE_TIME = Histogram(
    "moemesh_request_queue_time_seconds",
    "Time a request waited before the engine took it up (first scheduled; PD decode: its pages reserved).",
    ["role"], buckets=_LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("moemesh_prompt_tokens_total", "Prompt tokens of requests taken up.", ["role"])
GENERATION_TOKENS = Counter("moemesh_generation_tokens_total", "Output tokens produced.", ["role"])
REQUESTS = Counter("moemesh_requests_total", "Requests that ended, by how they ended.", ["role", "outcome"])
REQUEST_MIGRATIONS = Counter(
    "moemesh_request_migrations_total",
    "Requests the gateway moved to other workers after theirs failed mid-request (they continue after the "
    "tokens already streamed).")

KV_TRANSFER_BYTES = Counter(
    "moemesh_kv_transfer_bytes_total", "KV bytes moved between prefill and decode workers.", ["side", "plane"])
KV_TRANSFER_LATENCY = Histogram(
    "moemesh_kv_transfer_latency_seconds",
    "Duration of one request's KV handoff (sender: the send; receiver: registration to the last chunk; "
    "room: the sender's resolve to the receiver's success report).",
    ["side", "plane"], buckets=_TRANSFER_BUCKETS)
KV_TRANSFER_FAILURES = Counter(
    "moemesh_kv_transfer_failures_total", "KV handoffs that failed.", ["side", "plane"])

# Engine state, collected at scrape time: (family, help, key of the source's load dict).
_LOAD_GAUGES = (
    ("moemesh_num_requests_running", "Requests running (decoding or prefilling; gateway: in flight).",
     "num_running"),
    ("moemesh_num_requests_waiting", "Requests waiting (queued, or waiting for KV pages or KV).", "num_waiting"),
    ("moemesh_kv_pages_used", "KV cache pages in use (total less free).", "num_used_pages"),
    ("moemesh_kv_pages_free", "KV cache pages a new request could take (free plus evictable cache).",
     "num_free_pages"),
    ("moemesh_prefix_cache_hit_rate", "Fraction of prompt tokens served from the prefix cache.",
     "prefix_cache_hit_rate"),
)
EXPERT_BALANCEDNESS = "moemesh_expert_load_balancedness"

LoadFn = Callable[[Any], dict[str, float]]
ExpertFn = Callable[[Any], Iterable[tuple[int, float]]]


class _Sources:
    """Owners (weakly held) with the role and functions that read their state."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.load: weakref.WeakKeyDictionary[Any, tuple[str, LoadFn]] = weakref.WeakKeyDictionary()
        self.experts: weakref.WeakKeyDictionary[Any, tuple[str, ExpertFn]] = weakref.WeakKeyDictionary()


_SOURCES = _Sources()


def register_load_source(role: str, owner: Any, fn: LoadFn) -> None:
    """Report `fn(owner)` (keys: num_running, num_waiting, num_free_pages, num_pages,
    prefix_cache_hit_rate; any may be missing) under `role` at every scrape, while `owner` lives.
    `fn` must not hold `owner` itself (it gets it as its argument)."""
    with _SOURCES.lock:
        _SOURCES.load[owner] = (role, fn)


def register_expert_source(role: str, owner: Any, fn: ExpertFn) -> None:
    """Report `fn(owner)`, pairs (layer, balancedness), as `moemesh_expert_load_balancedness`."""
    with _SOURCES.lock:
        _SOURCES.experts[owner] = (role, fn)


def unregister_sources(owner: Any) -> None:
    with _SOURCES.lock:
        _SOURCES.load.pop(owner, None)
        _SOURCES.experts.pop(owner, None)


class _StateCollector(Collector):
    """The gauges, summed over the sources of one role (several workers in one process add up)."""

    def describe(self) -> Iterator[Any]:
        for name, doc, _ in _LOAD_GAUGES:
            yield GaugeMetricFamily(name, doc, labels=["role"])
        yield GaugeMetricFamily(EXPERT_BALANCEDNESS, "", labels=["role", "layer"])

    def collect(self) -> Iterator[Any]:
        with _SOURCES.lock:
            loads = [(role, fn, owner) for owner, (role, fn) in _SOURCES.load.items()]
            experts = [(role, fn, owner) for owner, (role, fn) in _SOURCES.experts.items()]
        per_role: dict[str, dict[str, list[float]]] = {}
        for role, fn, owner in loads:
            try:
                load = dict(fn(owner))
            except Exception:  # a source going away mid-scrape must not break the scrape
                log.debug("load source of %s failed", role, exc_info=True)
                continue
            if "num_pages" in load and "num_free_pages" in load:
                load["num_used_pages"] = load["num_pages"] - load["num_free_pages"]
            for key, value in load.items():
                per_role.setdefault(role, {}).setdefault(key, []).append(float(value))
        for name, doc, key in _LOAD_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["role"])
            for role, values in sorted(per_role.items()):
                if key in values:
                    vals = values[key]
                    # A rate averages over workers; counts add up.
                    family.add_metric([role], sum(vals) / len(vals) if key.endswith("_rate") else sum(vals))
            yield family
        family = GaugeMetricFamily(
            EXPERT_BALANCEDNESS,
            "Expert-parallel load balance of each MoE layer: mean over max of the tokens routed to each EP rank "
            "(1.0 is perfectly even).", labels=["role", "layer"])
        seen: set[tuple[str, str]] = set()
        for role, fn, owner in experts:
            try:
                pairs = list(fn(owner))
            except Exception:
                log.debug("expert source of %s failed", role, exc_info=True)
                continue
            for layer, value in pairs:
                key = (role, str(layer))
                if key not in seen:  # one worker per role and layer (several in one process: the first)
                    seen.add(key)
                    family.add_metric([role, str(layer)], float(value))
        yield family


REGISTRY.register(_StateCollector())


def metrics_exposition(accept: str | None = None) -> tuple[bytes, str]:
    """(body, content type) of this process's metrics, for an HTTP `/metrics` route (the REST facade's).

    `accept`: the request's Accept header (OpenMetrics when it asks for it), None for the text format.
    """
    if accept:
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept)
        return encoder(REGISTRY), content_type
    return prometheus_client.generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class MetricsServer:
    """This process's `/metrics` HTTP server (one per process)."""

    def __init__(self, server: Any, thread: threading.Thread, host: str, port: int) -> None:
        self.server = server
        self.thread = thread
        self.host = host
        self.port = port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(host: str, port: int, fallback: bool = False) -> MetricsServer:
    """A `/metrics` HTTP server on host:port (0: a free port); with `fallback`, a taken port gives way
    to a free one with a warning, else it raises OSError."""
    try:
        server, thread = prometheus_client.start_http_server(port, addr=host)
    except OSError as e:
        if not fallback or port == 0:
            raise OSError(f"cannot serve metrics on {host}:{port}: {e}") from e
        log.warning("metrics port %d is taken (%s); serving metrics on a free port instead", port, e)
        server, thread = prometheus_client.start_http_server(0, addr=host)
    return MetricsServer(server, thread, host, server.server_address[1])


_server: MetricsServer | None = None
_service = ""
_announced = False


def start_metrics_server(service: str, host: str, port: int | None,
                         default_port: int | None = None) -> MetricsServer | None:
    """This process's `/metrics` server; None when port is -1. Logs `SERVICE metrics on HOST:PORT`.

    `port` None is `default_port` (default: the service's in DEFAULT_METRICS_PORTS), which falls back
    to a free port with a warning when it is taken (several services on one host); an explicit port
    that is taken raises OSError. 0 picks a free port. One server per process: later calls return it.
    """
    global _server, _service
    if _server is not None:
        return _server
    fallback = port is None
    if port is None:
        port = default_port if default_port is not None else DEFAULT_METRICS_PORTS.get(service, 0)
    if port < 0:
        return None
    _server = serve_metrics(host, port, fallback)
    _service = service
    log.info("%s", readiness.ready_line(service, _server.address, readiness.METRICS))
    return _server


def announce_metrics() -> None:
    """Print `SERVICE metrics on HOST:PORT` to stdout, once, when this process serves metrics.

    Call it right after the service's `SERVICE listening on ADDR` line: launchers read stdout up to
    that line, so the metrics line must come after it, never before.
    """
    global _announced
    if _server is not None and not _announced:
        _announced = True
        readiness.write_line(readiness.ready_line(_service, _server.address, readiness.METRICS))
