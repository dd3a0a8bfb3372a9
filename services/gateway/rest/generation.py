"""One REST call's requests run through the core: opened together, read as one stream, kept per choice.

    gen = Generation(core)
    await gen.start(requests)          # validates and routes each now: errors raise before any response
    await gen.first(request)           # streaming: the first output (errors before it still raise)
    async for choice, response in gen.events():
        ...                            # choice is updated with response already
    gen.close()                        # idempotent; cancels whatever still runs, downstream too

    choices = await gen.collect(request)   # or, not streaming: everything

Each request is read by its own task into one queue, so choices stream as their tokens come. A choice
that fails fails the call: the others are cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from moemesh.services.gateway.core import GatewayCore
from moemesh.services.gateway.rest.errors import ApiError
from moemesh.services.gateway.rest.schemas import PromptTokensDetails, Usage
from moemesh.v1 import common_pb2, gateway_pb2

T = TypeVar("T")

FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
    common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}


@dataclass
class Choice:
    """What one request of the call produced so far."""

    index: int
    texts: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)  # chat, with a reasoning parser
    tool_calls: list[gateway_pb2.ToolCallDelta] = field(default_factory=list)  # chat with tools: the pieces
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[common_pb2.StepLogprobs] = field(default_factory=list)
    prompt_logprobs: list[common_pb2.StepLogprobs] = field(default_factory=list)  # echo with logprobs
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    usage: gateway_pb2.Usage | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def reasoning_text(self) -> str:
        return "".join(self.reasoning)

    def add(self, r: gateway_pb2.GenerateResponse) -> None:
        self.texts.append(r.text)
        self.reasoning.append(r.reasoning_text)
        self.tool_calls.extend(r.tool_calls)
        self.token_ids.extend(r.token_ids)
        self.logprobs.extend(r.logprobs)
        self.prompt_logprobs.extend(r.prompt_logprobs)
        if r.finish_reason:
            self.finish_reason = FINISH_REASONS.get(r.finish_reason, "stop")
            which = r.WhichOneof("stop_reason")
            self.stop_reason = getattr(r, which) if which else None
            self.usage = r.usage


class Generation:
    """The requests of one call (`per_prompt` consecutive requests share a prompt)."""

    def __init__(self, core: GatewayCore, per_prompt: int = 1, active: set[Generation] | None = None) -> None:
        self.core = core
        self.per_prompt = per_prompt
        self._active = active  # the app's running calls, for `abort` at shutdown
        self.choices: list[Choice] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._queue: asyncio.Queue[tuple[int, gateway_pb2.GenerateResponse | None, Exception | None]] = \
            asyncio.Queue()
        self._iter: AsyncIterator[tuple[Choice, gateway_pb2.GenerateResponse]] | None = None
        self._first: tuple[Choice, gateway_pb2.GenerateResponse] | None = None

    async def start(self, requests: list[gateway_pb2.GenerateRequest]) -> None:
        """Open every request (raises the first one's error, cancelling those already started)."""
        loop = asyncio.get_running_loop()
        if self._active is not None:
            self._active.add(self)
        try:
            for i, req in enumerate(requests):
                stream = self.core.open(req)
                self.choices.append(Choice(i))
                self._tasks.append(loop.create_task(self._pump(i, stream)))
                # Let the stream take its workers before the next choice is routed, so the router sees
                # the load the previous choices put on them.
                await asyncio.sleep(0)
        except BaseException:
            self.close()
            raise

    async def _pump(self, i: int, stream: AsyncIterator[gateway_pb2.GenerateResponse]) -> None:
        try:
            async for response in stream:
                self._queue.put_nowait((i, response, None))
        except Exception as exc:
            self._queue.put_nowait((i, None, exc))
            return
        self._queue.put_nowait((i, None, None))

    async def _events(self) -> AsyncIterator[tuple[Choice, gateway_pb2.GenerateResponse]]:
        running = len(self._tasks)
        try:
            while running:
                i, response, exc = await self._queue.get()
                if exc is not None:
                    raise exc
                if response is None:
                    running -= 1
                    continue
                choice = self.choices[i]
                choice.add(response)
                yield choice, response
        finally:
            self.close()

    async def first(self, request: Request) -> None:
        """Wait for the first response of any choice (kept for `events`), so that a stream whose
        requests fail before any output (queues full, deadline, worker gone) still gets an HTTP status."""
        self._iter = self._events()
        self._first = await self._unless_disconnected(request, self._iter.__anext__())

    async def events(self) -> AsyncIterator[tuple[Choice, gateway_pb2.GenerateResponse]]:
        """Every response of every request as it arrives, after adding it to its choice."""
        it = self._iter if self._iter is not None else self._events()
        try:
            if self._first is not None:
                first, self._first = self._first, None
                yield first
            async for event in it:
                yield event
        finally:
            self.close()

    async def collect(self, request: Request) -> list[Choice]:
        """Read every request to its end; the client disconnecting cancels them (499)."""

        async def consume() -> None:
            async for _ in self.events():
                pass

        await self._unless_disconnected(request, consume())
        return self.choices

    async def _unless_disconnected(self, request: Request, step: Awaitable[T]) -> T:
        work = asyncio.ensure_future(step)
        watch = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                return work.result()  # raises the call's error
            raise ApiError(499, "the client disconnected")
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                self.close()

    def close(self) -> None:
        """Cancel every request still running (their streams cancel and abort them on the workers)."""
        for task in self._tasks:
            task.cancel()
        if self._active is not None:
            self._active.discard(self)

    def abort(self, exc: Exception) -> None:
        """End the call with `exc`, which its reader gets next (a stream sends it as its last event)."""
        self._queue.put_nowait((-1, None, exc))
        self.close()

    def usage(self) -> Usage:
        """Prompt tokens once per prompt, completion tokens of every choice."""
        prompt = cached = completion = 0
        for c in self.choices:
            if c.usage is None:
                continue
            completion += c.usage.completion_tokens
            if c.index % self.per_prompt == 0:
                prompt += c.usage.prompt_tokens
                cached += c.usage.cached_prompt_tokens
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


async def disconnected(request: Request) -> None:
    """Return once the client has gone (its body is already read: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
