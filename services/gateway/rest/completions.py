"""POST /v1/completions: OpenAI's legacy completions, streamed or not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from moemesh.services.gateway.rest import sse
from moemesh.services.gateway.rest.errors import DOCUMENTED
from moemesh.services.gateway.rest.generation import Choice, Generation
from moemesh.services.gateway.rest.logprobs import completion_logprobs
from moemesh.services.gateway.rest.params import completion_prompts, completion_requests
from moemesh.services.gateway.rest.schemas import (
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Usage,
)
from moemesh.services.gateway.rest.state import RestState, new_id, rest_state
from moemesh.telemetry import http_trace_context

router = APIRouter()


@router.post(
    "/v1/completions", response_model=CompletionResponse, summary="Create a completion",
    responses={200: {"description": "The completion (JSON), or with `stream: true` its chunks as events.",
                     "content": sse.documented(CompletionChunk)},
               **{s: {"model": ErrorResponse, "description": d} for s, d in DOCUMENTED.items()}})
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state = rest_state(request)
    state.unknown_fields.note("/v1/completions", body)
    call = _Call(state, body)
    requests = completion_requests(body, call.id)
    gen = state.generation(per_prompt=body.n)
    with http_trace_context(request.headers):  # an incoming W3C traceparent parents the gateway's span
        await gen.start(requests)
    if body.stream:
        await gen.first(request)  # a failure before any output is still an HTTP error, not an event
        return sse.event_stream(call.stream(gen), on_close=gen.close)
    choices = await gen.collect(request)
    response = CompletionResponse(id=call.id, created=call.created, model=state.model_name,
                                  choices=[call.final_choice(c) for c in choices], usage=gen.usage())
    return JSONResponse(response.model_dump(mode="json"))


class _Call:
    """One completions call: its id, echo prefixes and the per-choice text offsets of streamed logprobs."""

    def __init__(self, state: RestState, body: CompletionRequest) -> None:
        self.state = state
        self.body = body
        self.id = new_id("cmpl")
        self.created = int(time.time())
        self.prefixes = [self._echo(p) for p in completion_prompts(body)] if body.echo else None
        self.offsets: dict[int, int] = {}

    def _echo(self, prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.state.core.model.tokenizer.decode(prompt)

    def prefix(self, index: int) -> str:
        return self.prefixes[index // self.body.n] if self.prefixes else ""

    def final_choice(self, c: Choice) -> CompletionChoice:
        logprobs = None
        if self.body.logprobs is not None:
            logprobs, _ = completion_logprobs(self.state.texts, c.token_ids, c.logprobs)
        return CompletionChoice(index=c.index, text=self.prefix(c.index) + c.text, logprobs=logprobs,
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason)

    async def stream(self, gen: Generation) -> AsyncIterator[bytes]:
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        exclude = None if include_usage else {"usage"}
        echoed: set[int] = set()
        async for c, r in gen.events():
            text = r.text
            if c.index not in echoed:
                echoed.add(c.index)
                text = self.prefix(c.index) + text
            logprobs = None
            if self.body.logprobs is not None:
                logprobs, self.offsets[c.index] = completion_logprobs(
                    self.state.texts, r.token_ids, r.logprobs, self.offsets.get(c.index, 0))
            last = bool(r.finish_reason)
            if not (text or (logprobs and logprobs.tokens) or last):
                continue
            choice = CompletionChoice(index=c.index, text=text, logprobs=logprobs,
                                      finish_reason=c.finish_reason if last else None,
                                      stop_reason=c.stop_reason if last else None)
            yield sse.event(self.chunk([choice]), exclude)
        if include_usage:
            yield sse.event(self.chunk([], gen.usage()))

    def chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionChunk:
        return CompletionChunk(id=self.id, created=self.created, model=self.state.model_name, choices=choices,
                               usage=usage)
