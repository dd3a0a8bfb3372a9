"""GET /v1/models, /v1/models/{id}, /health and /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from moemesh.services.gateway.registry import DECODE, PREFILL
from moemesh.services.gateway.rest.errors import ApiError
from moemesh.services.gateway.rest.metrics import CONTENT_TYPE
from moemesh.services.gateway.rest.schemas import ErrorResponse, Health, ModelCard, ModelList
from moemesh.services.gateway.rest.state import RestState, rest_state

models = APIRouter()
probes = APIRouter()


def _card(state: RestState) -> ModelCard:
    model = state.core.model
    # `root` as vLLM reports it: where the model was loaded from. Absolute, so that a client in another working
    # folder (`moemesh bench serve` loads its tokenizer from there) finds the same folder.
    return ModelCard(id=model.name, created=state.started, root=str(model.path.absolute()),
                     max_model_len=model.max_model_len)


@models.get("/v1/models", response_model=ModelList, summary="List the served models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(rest_state(request))])


@models.get("/v1/models/{model_id:path}", response_model=ModelCard, summary="Describe a served model",
            responses={404: {"model": ErrorResponse, "description": "The model is not served here."}})
async def get_model(model_id: str, request: Request) -> ModelCard:
    state = rest_state(request)
    if model_id != state.model_name:
        raise ApiError(404, f"model {model_id!r} is not served here; this mesh serves {state.model_name!r}",
                       "model", "model_not_found")
    return _card(state)


@probes.get("/health", response_model=Health, summary="Readiness: a decode worker is registered and ready",
            responses={503: {"model": Health, "description": "No decode worker can take a request, or the "
                                                             "gateway is shutting down (draining)."}})
async def health(request: Request) -> JSONResponse:
    state = rest_state(request)
    registry = state.core.registry
    decode = sum(w.routable for w in registry.workers(DECODE))
    prefill = sum(w.routable for w in registry.workers(PREFILL))
    status = "draining" if state.draining else "ok" if state.core.has_decode_workers() else "unavailable"
    body = Health(status=status, decode_workers=decode, prefill_workers=prefill)
    return JSONResponse(body.model_dump(), status_code=200 if status == "ok" else 503)


@probes.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format 0.0.4."}})
async def metrics(request: Request) -> Response:
    body, content_type = rest_state(request).metrics(request.headers.get("accept"))
    return Response(body, media_type=content_type)
