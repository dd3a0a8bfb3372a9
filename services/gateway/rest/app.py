"""The FastAPI app of the OpenAI-compatible REST facade, calling a `GatewayCore` directly (no gRPC hop)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Security

from moemesh.service.auth import ApiKeys, parse_api_keys
from moemesh.services.gateway.core import GatewayCore
from moemesh.services.gateway.rest import chat, completions, errors, info, tokens
from moemesh.services.gateway.rest.auth import PROTECTED_PREFIX, ApiKeyMiddleware, bearer
from moemesh.services.gateway.rest.drain import DrainMiddleware
from moemesh.services.gateway.rest.metrics import Exposition, no_metrics
from moemesh.services.gateway.rest.schemas import ChatCompletionChunk, CompletionChunk
from moemesh.services.gateway.rest.state import RestState
from moemesh.version import package_version

# Streamed as events, so no route names them: added to the document's components by hand.
_CHUNKS = (CompletionChunk, ChatCompletionChunk)


def create_app(core: GatewayCore, api_key: str | Sequence[str] | None = None,
               metrics: Exposition | None = None) -> FastAPI:
    """The app serving `core`; with `api_key` (a key, several comma-separated, or a list of them), /v1
    calls need one as a bearer token; `metrics` renders GET /metrics (e.g.
    `moemesh.telemetry.metrics_exposition`; default: an empty body)."""
    keys = parse_api_keys(api_key)
    app = FastAPI(title="moemesh gateway", version=package_version(),
                  description="OpenAI-compatible completions and chat completions over a moemesh mesh.")
    app.state.rest = RestState(core, metrics if metrics is not None else no_metrics)
    errors.install(app)
    # The key is enforced by the middleware (before the body is read); the dependency only documents it.
    v1_deps = [Security(bearer)] if keys else []
    for router in (completions.router, chat.router, info.models):
        app.include_router(router, dependencies=v1_deps)
    app.include_router(info.probes)
    app.include_router(tokens.router)
    if keys:
        app.add_middleware(ApiKeyMiddleware, keys=ApiKeys(keys))
    # Added last, so it runs first: a draining gateway does nothing for a new call, not even check its key.
    app.add_middleware(DrainMiddleware, state=app.state.rest)
    _fix_openapi(app, documents_key=bool(keys))
    return app


def _fix_openapi(app: FastAPI, documents_key: bool) -> None:
    """Make FastAPI's document say what the app does: bad input is a 400 (documented per route), never
    the 422 FastAPI lists by default; /v1 calls may answer 401 when a key is required; the streamed
    chunk schemas are components."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default()  # caches itself in app.openapi_schema, which is completed here
            for route, path in schema.get("paths", {}).items():
                for operation in path.values():
                    responses = operation.setdefault("responses", {})
                    responses.pop("422", None)
                    if documents_key and route.startswith(PROTECTED_PREFIX):
                        responses["401"] = {"description": errors.UNAUTHORIZED, "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            for model in _CHUNKS:
                spec = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, sub in spec.pop("$defs", {}).items():
                    components.setdefault(name, sub)
                components[model.__name__] = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
