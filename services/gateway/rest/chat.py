"""POST /v1/chat/completions: chat messages rendered with the model's chat template, streamed or not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

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
    ChatToolCall,
    DeltaFunctionCall,
    DeltaToolCall,
    ErrorResponse,
    ResponseFunctionCall,
    Usage,
)
from moemesh.services.gateway.rest.state import RestState, new_id, rest_state
from moemesh.telemetry import http_trace_context
from moemesh.v1 import common_pb2, gateway_pb2

router = APIRouter()


@router.post(
    "/v1/chat/completions", response_model=ChatCompletionResponse, summary="Create a chat completion",
    responses={200: {"description": "The chat completion (JSON), or with `stream: true` its chunks as events.",
                     "content": sse.documented(ChatCompletionChunk)},
               **{s: {"model": ErrorResponse, "description": d} for s, d in DOCUMENTED.items()}})
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = rest_state(request)
    state.unknown_fields.note("/v1/chat/completions", body)
    call = _Call(state, body)
    requests = chat_requests(body, call.id)
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
        calls = tool_calls(c.tool_calls)
        # As OpenAI: a message that only calls tools has null content.
        message = ChatResponseMessage(content=c.text or (None if calls else ""),
                                      reasoning_content=c.reasoning_text or None, tool_calls=calls)
        return ChatChoice(index=c.index, message=message, logprobs=self.logprobs(c.token_ids, c.logprobs),
                          finish_reason=c.finish_reason, stop_reason=c.stop_reason)

    async def stream(self, gen: Generation) -> AsyncIterator[bytes]:
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        # As OpenAI: the role first, in a chunk of its own per choice, then content deltas.
        for c in gen.choices:
            yield self.event([ChatStreamChoice(index=c.index, delta=ChatDelta(role="assistant", content=""))],
                             include_usage)
        async for c, r in gen.events():
            last = bool(r.finish_reason)
            logprobs = self.logprobs(r.token_ids, r.logprobs) if r.token_ids else None
            deltas = response_deltas(r)
            if not deltas and (logprobs or last):
                deltas = [ChatDelta()]  # nothing new to say but logprobs, or the finish reason
            for k, delta in enumerate(deltas):
                final = last and k == len(deltas) - 1
                choice = ChatStreamChoice(index=c.index, delta=delta, logprobs=logprobs if k == 0 else None,
                                          finish_reason=c.finish_reason if final else None,
                                          stop_reason=c.stop_reason if final else None)
                yield self.event([choice], include_usage)
        if include_usage:
            yield self.event([], include_usage, gen.usage())

    def event(self, choices: list[ChatStreamChoice], include_usage: bool, usage: Usage | None = None) -> bytes:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.state.model_name, choices=choices,
                                    usage=usage).model_dump(mode="json", exclude=None if include_usage else {"usage"})
        for choice in chunk["choices"]:  # a delta carries only what changed, as OpenAI's do
            choice["delta"] = _without_nulls(choice["delta"])
        return sse.event(chunk)


def response_deltas(r: gateway_pb2.GenerateResponse) -> list[ChatDelta]:
    """The stream deltas of one core response: its text (reasoning and content) first, then one delta per
    tool-call piece, so a call's name always comes in a chunk before its arguments, as OpenAI sends them."""
    deltas = []
    if r.text or r.reasoning_text:
        deltas.append(ChatDelta(content=r.text or None, reasoning_content=r.reasoning_text or None))
    for piece in r.tool_calls:
        if piece.id or piece.name:  # a call's first piece
            call = DeltaToolCall(index=piece.index, id=piece.id, type="function",
                                 function=DeltaFunctionCall(name=piece.name, arguments=""))
        else:
            call = DeltaToolCall(index=piece.index, function=DeltaFunctionCall(arguments=piece.arguments))
        deltas.append(ChatDelta(tool_calls=[call]))
    return deltas


def tool_calls(pieces: Sequence[gateway_pb2.ToolCallDelta]) -> list[ChatToolCall]:
    """A choice's tool-call pieces joined into its calls, in index order."""
    calls: dict[int, ChatToolCall] = {}
    for piece in pieces:
        if piece.id or piece.name:
            calls[piece.index] = ChatToolCall(id=piece.id, function=ResponseFunctionCall(name=piece.name, arguments=""))
        elif piece.index in calls:
            calls[piece.index].function.arguments += piece.arguments
    return [calls[i] for i in sorted(calls)]


def _without_nulls(value: Any) -> Any:
    """`value` with null members dropped at every depth (tool-call deltas included)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value
