"""Telemetry for every moemesh service: OpenTelemetry tracing, structlog logging, Prometheus metrics.

    from moemesh.telemetry import add_telemetry_arguments, setup_telemetry
    add_telemetry_arguments(parser, default_metrics_port=9105)   # before apply_env_defaults(parser)
    setup_telemetry("decode", args)                              # once per process, before serving
    ...; announce("decode", address); announce_metrics()         # stdout: "decode metrics on HOST:PORT"

Modules, imported on first use so that a bare `import moemesh.telemetry` costs nothing:
- `tracing`: the tracer provider (OTLP export only when OTEL_EXPORTER_OTLP_ENDPOINT is set), spans with
  explicit times, W3C context from HTTP headers.
- `grpc_tracing`: the grpc.aio client interceptor (injects `traceparent`) and server interceptor
  (extracts it, one SERVER span per RPC); `moemesh.service.channel.mesh_channel` puts the first on every channel.
- `logs`: structlog JSON lines (or a readable console), stdlib logging routed through it, per-request
  `request_id`/`trace_id` context.
- `metrics`: the `moemesh_*` Prometheus families, the `/metrics` server, the exposition text.
- `requests`: a request's engine timestamps turned into spans and histogram observations.
- `expert_load`: per (layer, expert) routed-token counts from Router hooks; balancedness (imports torch).
- `setup`: the process-level options and `setup_telemetry`.
- `readiness`: the readiness lines ("decode listening on ADDR", ...) every service prints and every launcher
  reads, and `moemesh up`'s ready file.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "add_telemetry_arguments": "moemesh.telemetry.setup",
    "setup_telemetry": "moemesh.telemetry.setup",
    "metrics_exposition": "moemesh.telemetry.metrics",
    "announce_metrics": "moemesh.telemetry.metrics",
    "http_trace_context": "moemesh.telemetry.tracing",
    "bind_request": "moemesh.telemetry.logs",
    "request_log_context": "moemesh.telemetry.logs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moemesh.telemetry' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
