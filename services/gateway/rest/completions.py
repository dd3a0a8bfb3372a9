"""POST /v1/completions: OpenAI's legacy completions, streamed or not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from moemesh.services.gateway.rest import sse
from moemesh.services.gateway.rest.errors import DOCUMENTED
from moemesh.services.gateway.rest.generation import Choice, Generation
from moemesh.services.gateway.rest.logprobs import completion_logprobs, echo_logprobs, merge_logprobs
from moemesh.services.gateway.rest.params import completion_prompts, completion_requests
from moemesh.services.gateway.rest.schemas import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
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
                                  choices=[call.final_choice(c) for c in choices], usage=call.usage(gen))
    return JSONResponse(response.model_dump(mode="json"))


class _Call:
    """One completions call: its id, echo prefixes and the per-choice text offsets of streamed logprobs."""

    def __init__(self, state: RestState, body: CompletionRequest) -> None:
        self.state = state
        self.body = body
        self.id = new_id("cmpl")
        self.created = int(time.time())
        prompts = completion_prompts(body)
        self.prefixes = [self._echo(p) for p in prompts] if body.echo else None
        # Echo with logprobs: the prompts' token ids, tokenized as the core tokenizes them.
        self.prompt_ids = [self._ids(p) for p in prompts] if body.echo and body.logprobs is not None else None
        self.offsets: dict[int, int] = {}
        # max_tokens 0 with echo scores the prompt: the one token the workers make is not shown or counted.
        self.score_only = body.echo and body.max_tokens == 0

    def _echo(self, prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.state.core.model.tokenizer.decode(prompt)

    def _ids(self, prompt: str | list[int]) -> list[int]:
        return self.state.core.model.tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) \
            else list(prompt)

    def _echo_logprobs(self, index: int, steps: list) -> tuple[CompletionLogprobs | None, int]:
        """The echoed prompt's logprobs for choice `index` and the offset after it; (None, 0) without echo."""
        if self.prompt_ids is None:
            return None, 0
        return echo_logprobs(self.state.texts, self.prompt_ids[index // self.body.n], steps)

    def prefix(self, index: int) -> str:
        return self.prefixes[index // self.body.n] if self.prefixes else ""

    def final_choice(self, c: Choice) -> CompletionChoice:
        logprobs = None
        token_ids, steps, text = (c.token_ids, c.logprobs, c.text) if not self.score_only else ([], [], "")
        if self.body.logprobs is not None:
            echoed, offset = self._echo_logprobs(c.index, c.prompt_logprobs)
            logprobs, _ = completion_logprobs(self.state.texts, token_ids, steps, offset)
            if echoed is not None:
                logprobs = merge_logprobs(echoed, logprobs)
        if self.score_only:
            return CompletionChoice(index=c.index, text=self.prefix(c.index), logprobs=logprobs,
                                    finish_reason="length", stop_reason=None)
        return CompletionChoice(index=c.index, text=self.prefix(c.index) + text, logprobs=logprobs,
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason)

    def usage(self, gen: Generation) -> Usage:
        """The call's usage; scoring only (max_tokens 0) generated nothing the client sees."""
        usage = gen.usage()
        if self.score_only:
            usage.completion_tokens, usage.total_tokens = 0, usage.prompt_tokens
        return usage

    async def stream(self, gen: Generation) -> AsyncIterator[bytes]:
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        exclude = None if include_usage else {"usage"}
        echoed: set[int] = set()
        async for c, r in gen.events():
            text = r.text if not self.score_only else ""
            token_ids, steps = (r.token_ids, r.logprobs) if not self.score_only else ([], [])
            prompt_lps = None
            if c.index not in echoed:
                echoed.add(c.index)
                text = self.prefix(c.index) + text
                if self.body.logprobs is not None:
                    prompt_lps, self.offsets[c.index] = self._echo_logprobs(c.index, list(r.prompt_logprobs))
            logprobs = None
            if self.body.logprobs is not None:
                logprobs, self.offsets[c.index] = completion_logprobs(
                    self.state.texts, token_ids, steps, self.offsets.get(c.index, 0))
                if prompt_lps is not None:
                    logprobs = merge_logprobs(prompt_lps, logprobs)
            last = bool(r.finish_reason)
            if not (text or (logprobs and logprobs.tokens) or last):
                continue
            finish = ("length" if self.score_only else c.finish_reason) if last else None
            choice = CompletionChoice(index=c.index, text=text, logprobs=logprobs, finish_reason=finish,
                                      stop_reason=c.stop_reason if last and not self.score_only else None)
            yield sse.event(self.chunk([choice]), exclude)
        if include_usage:
            yield sse.event(self.chunk([], self.usage(gen)))

    def chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionChunk:
        return CompletionChunk(id=self.id, created=self.created, model=self.state.model_name, choices=choices,
                               usage=usage)
