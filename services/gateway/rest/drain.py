"""While the gateway drains (SIGTERM), new REST calls are refused with 503, before any work is done for them.

A client of the REST facade cannot resume a broken stream, so a stopping gateway keeps its listener open
and serves the calls it already took to their end; what arrives meanwhile (a load balancer that has not yet
seen /health go 503, a kept-alive connection) gets OpenAI's error body and `Connection: close`, so that the
client's retry opens a new connection, which the balancer sends elsewhere. /health (503, "draining") and
/metrics are still answered: probes and scrapers must see the drain.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from moemesh.services.gateway.rest.errors import error_response
from moemesh.services.gateway.rest.state import RestState

# Answered by their routes during the drain.
OPEN_WHILE_DRAINING = frozenset({"/health", "/metrics"})
DRAINING_MESSAGE = "the gateway is shutting down: it takes no new requests"


class DrainMiddleware:
    """Answers 503 (code `unavailable`, as the core's UNAVAILABLE) to every call but the probes while
    `state.draining`."""

    def __init__(self, app: ASGIApp, state: RestState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.state.draining or scope["path"] in OPEN_WHILE_DRAINING:
            await self.app(scope, receive, send)
            return
        response = error_response(503, DRAINING_MESSAGE, code="unavailable", headers={"Connection": "close"})
        await response(scope, receive, send)
