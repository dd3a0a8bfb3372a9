"""GET /metrics: Prometheus text exposition, from whatever `Exposition` the app is given.

An exposition is a function of the request's Accept header returning (body, content type), so
`moemesh.telemetry.metrics_exposition` plugs in as it is, and so does `registry_exposition(registry)`
for a `prometheus_client` registry. Until one is plugged in, the body is empty.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Exposition = Callable[[str | None], tuple[bytes, str]]


def no_metrics(accept: str | None = None) -> tuple[bytes, str]:
    """An empty exposition (no metrics registered yet)."""
    return b"", CONTENT_TYPE


def registry_exposition(registry: Any) -> Exposition:
    """The exposition of a `prometheus_client.CollectorRegistry` (the format the Accept header asks for)."""

    def render(accept: str | None = None) -> tuple[bytes, str]:
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept or "")
        return encoder(registry), content_type

    return render
