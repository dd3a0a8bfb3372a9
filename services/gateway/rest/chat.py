"""POST /v1/chat/completions: chat messages rendered with the model's chat template, streamed or not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from moemesh.services.gateway.rest import sse
from moemesh.services.gateway.rest.errors import DOCUMENTED
from moemesh.services.gateway.rest.generation import Choice, Generation
from moemesh.services.gateway.rest.logprobs import chat_logprobs
from moemesh.services.gateway.rest.params import chat_requests
from moemesh.services.gateway.rest.schemas import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    ChatStreamChoice,
    ErrorResponse,
    Usage,
)
from moemesh.services.gateway.rest.state import RestState, new_id, rest_state
from moemesh.telemetry import http_trace_context
from moemesh.v1 import common_pb2

router = APIRouter()


@router.post(
    "/v1/chat/completions", response_model=ChatCompletionResponse, summary="Create a chat completion",
    responses={200: {"description": "The chat completion (JSON), or with `stream: true` its chunks as events.",
                     "content": sse.documented(ChatCompletionChunk)},
               **{s: {"model": ErrorResponse, "description": d} for s, d in DOCUMENTED.items()}})
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = rest_state(request)
    call = _Call(state, body)
    requests = chat_requests(body, call.id, state.core.model.max_model_len)
    gen = state.generation(per_prompt=body.n)  # n choices of one prompt
    with http_trace_context(request.headers):  # an incoming W3C traceparent parents the gateway's span
        await gen.start(requests)
    if body.stream:
        await gen.first(request)  # a failure before any output is still an HTTP error, not an event
        return sse.event_stream(call.stream(gen), on_close=gen.close)
    choices = await gen.collect(request)
    response = ChatCompletionResponse(id=call.id, created=call.created, model=state.model_name,
                                      choices=[call.final_choice(c) for c in choices], usage=gen.usage())
    return JSONResponse(response.model_dump(mode="json"))


class _Call:
    """One chat call: its id and how its choices, chunks and logprobs are written."""

    def __init__(self, state: RestState, body: ChatCompletionRequest) -> None:
        self.state = state
        self.body = body
        self.id = new_id("chatcmpl")
        self.created = int(time.time())

    def logprobs(self, token_ids: Sequence[int], steps: Sequence[common_pb2.StepLogprobs]) -> ChatChoiceLogprobs | None:
        if not self.body.logprobs:
            return None
        return ChatChoiceLogprobs(content=chat_logprobs(self.state.texts, token_ids, steps))

    def final_choice(self, c: Choice) -> ChatChoice:
        return ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                          logprobs=self.logprobs(c.token_ids, c.logprobs), finish_reason=c.finish_reason,
                          stop_reason=c.stop_reason)

    async def stream(self, gen: Generation) -> AsyncIterator[bytes]:
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        # As OpenAI: the role first, in a chunk of its own per choice, then content deltas.
        for c in gen.choices:
            yield self.event([ChatStreamChoice(index=c.index, delta=ChatDelta(role="assistant", content=""))],
                             include_usage)
        async for c, r in gen.events():
            last = bool(r.finish_reason)
            if not (r.text or (self.body.logprobs and r.token_ids) or last):
                continue
            choice = ChatStreamChoice(index=c.index, delta=ChatDelta(content=r.text or None),
                                      logprobs=self.logprobs(r.token_ids, r.logprobs),
                                      finish_reason=c.finish_reason if last else None,
                                      stop_reason=c.stop_reason if last else None)
            yield self.event([choice], include_usage)
        if include_usage:
            yield self.event([], include_usage, gen.usage())

    def event(self, choices: list[ChatStreamChoice], include_usage: bool, usage: Usage | None = None) -> bytes:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.state.model_name, choices=choices,
                                    usage=usage).model_dump(mode="json", exclude=None if include_usage else {"usage"})
        for choice in chunk["choices"]:  # a delta carries only what changed, as OpenAI's do
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return sse.event(chunk)
