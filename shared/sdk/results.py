"""What the SDK returns: plain dataclasses, no protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Usage:
    """Token counts of a finished request."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a tool call being generated: `id` and `name` on the call's first piece (else None), then
    fragments of its `arguments` (a JSON text; join the fragments of one `index`)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class ToolCall:
    """A complete tool call: the function's `name` and its `arguments` as the model wrote them (JSON text)."""

    id: str
    name: str
    arguments: str = ""
    type: str = "function"


@dataclass(frozen=True)
class Chunk:
    """One message of a stream: the tokens made since the previous one.

    `logprobs[i]` is the logprob of `token_ids[i]` and `top_logprobs[i]` its step's most likely
    `(token_id, logprob)` pairs, when logprobs were asked for (else both None). `finish_reason`
    ("stop", "length", "abort", or "tool_calls" when a chat answer called tools), `stop_reason` (the matched
    stop token id or string) and `usage` are set on the last chunk only.

    Chat requests on a gateway with output parsers: `reasoning_text` is the think block's text and
    `tool_calls` the pieces of tool calls, both kept out of `text`.
    """

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    usage: Usage | None = None
    reasoning_text: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    # The first chunk of a request made with prompt_logprobs: per prompt token after the first, (logprob, top).
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


@dataclass(frozen=True)
class Completion:
    """A finished request: all its text and tokens (fields as in `Chunk`; `tool_calls` complete)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    stop_reason: int | str | None = None
    usage: Usage | None = None
    reasoning_text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


@dataclass(frozen=True)
class ModelInfo:
    """A model the mesh serves."""

    id: str
    max_model_len: int
    num_prefill_workers: int
    num_decode_workers: int
