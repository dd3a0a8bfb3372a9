"""POST /tokenize and /detokenize, GET /version: vLLM's helper endpoints, beside the OpenAI API."""

from __future__ import annotations

from fastapi import APIRouter, Request

from moemesh.service.errors import InvalidArgument
from moemesh.services.gateway.inputs import check_model, check_token_ids
from moemesh.services.gateway.rest.errors import DOCUMENTED, ApiError
from moemesh.services.gateway.rest.params import chat_tools, chat_turns
from moemesh.services.gateway.rest.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from moemesh.services.gateway.rest.state import rest_state
from moemesh.v1 import gateway_pb2
from moemesh.version import package_version

router = APIRouter()
_ERRORS = {s: {"model": ErrorResponse, "description": d} for s, d in DOCUMENTED.items()}


@router.post("/tokenize", response_model=TokenizeResponse, summary="Token ids of a text or of chat messages",
             responses=_ERRORS)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = rest_state(request)
    state.unknown_fields.note("/tokenize", body)
    core = state.core
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "give exactly one of prompt and messages", "prompt")
    req = gateway_pb2.TokenizeRequest(model=body.model or "", add_special_tokens=body.add_special_tokens)
    if body.prompt is not None:
        req.text = body.prompt
    else:
        req.messages.CopyFrom(gateway_pb2.ChatMessages(messages=chat_turns(body.messages),
                                                       add_generation_prompt=body.add_generation_prompt,
                                                       tools=chat_tools(body.tools)))
    out = core.tokenize(req)
    return TokenizeResponse(count=len(out.token_ids), max_model_len=out.max_model_len, tokens=list(out.token_ids))


@router.post("/detokenize", response_model=DetokenizeResponse, summary="The text of token ids", responses=_ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    model = rest_state(request).core.model
    check_model(body.model or "", model.name)
    try:
        check_token_ids(body.tokens, model.tokenizer.vocab_size)
    except InvalidArgument as e:
        raise ApiError(400, str(e).replace("token_ids", "tokens"), "tokens") from None
    return DetokenizeResponse(prompt=model.tokenizer.decode(body.tokens, skip_special_tokens=False))


@router.get("/version", response_model=VersionResponse, summary="moemesh's version")
async def version() -> VersionResponse:
    return VersionResponse(version=package_version())
