"""Server-Sent Events as OpenAI streams them: `data: {json}\\n\\n` per chunk, then `data: [DONE]\\n\\n`.

An error after the stream has begun (the status line is gone) is sent as one last `data:` event with
an OpenAI error object, then `[DONE]`, as vLLM does; the `openai` client raises it as an APIError.
A client that disconnects cancels the iteration (Starlette cancels the response), which closes the
request's streams and so cancels it downstream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from moemesh.services.gateway.rest.errors import describe, error_body

MEDIA_TYPE = "text/event-stream"
DONE = b"data: [DONE]\n\n"


def event(data: BaseModel | dict[str, Any], exclude: set[str] | None = None) -> bytes:
    """One `data:` event of a model (or of an already built dict)."""
    if isinstance(data, BaseModel):
        body = data.model_dump_json(exclude=exclude)
    else:
        body = json.dumps(data, separators=(",", ":"))
    return b"data: " + body.encode() + b"\n\n"


async def with_done(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`events`, then `[DONE]`; an error raised by `events` becomes an error event first."""
    try:
        async for chunk in events:
            yield chunk
    except Exception as exc:  # the status line is sent: report in the stream
        status, message, param, code = describe(exc)
        yield event(error_body(status, message, param, code))
    yield DONE


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that calls `on_close` however it ends, even if it never started iterating
    (the client was gone before the first event): the request's streams never outlive the response."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(with_done(events), media_type=MEDIA_TYPE,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def event_stream(events: AsyncIterator[bytes], on_close: Callable[[], None]) -> EventStreamResponse:
    """A text/event-stream response of `events` (no caching or proxy buffering of the stream)."""
    return EventStreamResponse(events, on_close)


def documented(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI `content` entry of a stream of `model` chunks (for the 200 response).

    Before OpenAPI 3.2 (the document is 3.1), an event stream's `schema` describes one event, as tools
    (schemathesis, code generators) read it: an object whose `data` is the chunk as JSON text, or `[DONE]`
    last (or an ErrorResponse when the stream fails after it began). `x-itemSchema` (3.2's `itemSchema` as an
    extension) points at the chunk's schema, which the app adds to the document's components.
    """
    name = model.__name__
    ref = f"#/components/schemas/{name}"
    event_schema = {
        "type": "object", "required": ["data"],
        "description": f"With `stream: true`: Server-Sent Events, `data: <{name}>` per chunk, ending with "
                       "`data: [DONE]`.",
        "properties": {
            "data": {"type": "string", "anyOf": [
                {"const": "[DONE]"},
                {"contentMediaType": "application/json", "contentSchema": {"anyOf": [
                    {"$ref": ref}, {"$ref": "#/components/schemas/ErrorResponse"}]}}],
                     "description": f"A {name} as JSON; `[DONE]` on the last event; an ErrorResponse when the "
                                    "request fails after the stream began."},
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer", "minimum": 0},
        },
    }
    return {MEDIA_TYPE: {"schema": event_schema, "x-itemSchema": {"$ref": ref},
                         "example": f"data: {{...{name}...}}\n\ndata: [DONE]\n\n"}}
