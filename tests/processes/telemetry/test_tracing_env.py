"""Telemetry: W3C context through real grpc.aio interceptors on loopback, structlog lines, the metrics
server and options, expert-load balancedness."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.paths import ROOT

_PROBE = """
import json
from opentelemetry import trace
from moemesh.telemetry.tracing import configure_tracing
configure_tracing("decode")
provider = trace.get_tracer_provider()
processors = getattr(getattr(provider, "_active_span_processor", None), "_span_processors", ())
print(json.dumps({
    "service": provider.resource.attributes.get("service.name") if hasattr(provider, "resource") else None,
    "exporters": [type(getattr(p, "span_exporter", None) or getattr(p, "_exporter", None)).__name__
                  for p in processors],
    "sampler": type(getattr(provider, "sampler", None)).__name__,
}))
"""


@pytest.mark.parametrize(("env", "expected"), [
    ({}, {"service": "moemesh-decode", "exporters": []}),
    ({"OTEL_SERVICE_NAME": "decode-eu-1", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1",
      "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
     {"service": "decode-eu-1", "exporters": ["OTLPSpanExporter"], "sampler": "TraceIdRatioBased"}),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_TRACES_EXPORTER": "none"},
     {"service": "moemesh-decode", "exporters": []}),
    ({"OTEL_SDK_DISABLED": "true"}, {"service": None, "exporters": []}),
], ids=["no-endpoint", "otlp-named-sampled", "exporter-none", "sdk-disabled"])
def test_tracing_follows_the_standard_variables(env: dict[str, str], expected: dict) -> None:
    root = ROOT
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=root, env={**clean, "PYTHONPATH": str(root), **env},
                         capture_output=True, text=True, timeout=60, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert {k: got[k] for k in expected} == expected
