"""API keys: with any configured, every `/v1/...` call needs `Authorization: Bearer KEY` (else 401).

Checked in an ASGI middleware, before FastAPI reads the body, so an unauthenticated caller learns
nothing about its request (not even that its JSON is malformed). /health and /metrics stay open, as
in vLLM, for probes and scrapers. `bearer` is the matching security scheme for the OpenAPI document.
The keys are compared as the gRPC side compares them (`moemesh.service.auth.ApiKeys`, constant time).
"""

from __future__ import annotations

from fastapi.security import HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from moemesh.service.auth import ApiKeys, bearer_token
from moemesh.services.gateway.rest.errors import error_response

PROTECTED_PREFIX = "/v1/"
bearer = HTTPBearer(auto_error=False, description="The gateway's API key (--api-key / MOEMESH_API_KEY).")


class ApiKeyMiddleware:
    """Answers 401 (OpenAI's error body, code `invalid_api_key`) to a /v1 call without one of `keys`."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        response = error_response(401, "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                return self.keys.accepts(bearer_token(value))
        return False
