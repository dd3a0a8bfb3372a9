"""The API key: with one configured, every `/v1/...` call needs `Authorization: Bearer KEY` (else 401).

Checked in an ASGI middleware, before FastAPI reads the body, so an unauthenticated caller learns
nothing about its request (not even that its JSON is malformed). /health and /metrics stay open, as
in vLLM, for probes and scrapers. `bearer` is the matching security scheme for the OpenAPI document.
"""

from __future__ import annotations

import hmac

from fastapi.security import HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from services.gateway.rest.errors import error_response

PROTECTED_PREFIX = "/v1/"
bearer = HTTPBearer(auto_error=False, description="The gateway's API key (--api-key / MOEMESH_API_KEY).")


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

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
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False
