"""What the SDK returns: plain dataclasses, no protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Usage:
    """Token counts of a finished request."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class Chunk:
    """One message of a stream: the tokens made since the previous one.

    `logprobs[i]` is the logprob of `token_ids[i]` and `top_logprobs[i]` its step's most likely
    `(token_id, logprob)` pairs, when logprobs were asked for (else both None). `finish_reason`
    ("stop", "length" or "abort"), `stop_reason` (the matched stop token id or string) and `usage` are
    set on the last chunk only.
    """

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class Completion:
    """A finished request: all its text and tokens (fields as in `Chunk`)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    stop_reason: int | str | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class ModelInfo:
    """A model the mesh serves."""

    id: str
    max_model_len: int
    num_prefill_workers: int
    num_decode_workers: int
