"""Logprobs in OpenAI's two shapes: completions' parallel lists and chat's list of token objects.

A token is shown as the text of that token decoded alone (special tokens kept), as vLLM shows it; a
token holding part of a UTF-8 character shows U+FFFD. JSON has no infinities: -inf is -9999.0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from moemesh.model.tokenizer import Tokenizer
from moemesh.services.gateway.rest.schemas import ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs
from moemesh.v1 import common_pb2

NEG_INF_LOGPROB = -9999.0


class TokenTexts:
    """Token id -> its text, cached (at most one entry per vocabulary id)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else NEG_INF_LOGPROB


def completion_logprobs(texts: TokenTexts, token_ids: Sequence[int], steps: Sequence[common_pb2.StepLogprobs],
                        offset: int = 0) -> tuple[CompletionLogprobs, int]:
    """The logprobs of `token_ids`, their text offsets starting at `offset`; and the offset after them."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for token_id, step in zip(token_ids, steps, strict=False):
        text = texts(token_id)
        out.tokens.append(text)
        out.token_logprobs.append(_finite(step.logprob))
        out.top_logprobs.append({texts(t.token_id): _finite(t.logprob) for t in step.top})
        out.text_offset.append(offset)
        offset += len(text)
    return out, offset


def echo_logprobs(texts: TokenTexts, prompt_ids: Sequence[int], steps: Sequence[common_pb2.StepLogprobs]
                  ) -> tuple[CompletionLogprobs, int]:
    """The echoed prompt's logprobs: its first token has none (null, as OpenAI writes it), each later one its
    logprob given the tokens before it; and the text offset after the prompt."""
    first = texts(prompt_ids[0]) if prompt_ids else ""
    rest, offset = completion_logprobs(texts, prompt_ids[1:], steps, len(first))
    out = CompletionLogprobs(tokens=[first, *rest.tokens], token_logprobs=[None, *rest.token_logprobs],
                             top_logprobs=[None, *rest.top_logprobs], text_offset=[0, *rest.text_offset])
    return (out, offset) if prompt_ids else (rest, 0)


def merge_logprobs(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    """`a` then `b` (b's offsets already continue a's)."""
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs, text_offset=a.text_offset + b.text_offset)


def chat_logprobs(texts: TokenTexts, token_ids: Sequence[int],
                  steps: Sequence[common_pb2.StepLogprobs]) -> list[ChatTokenLogprob]:
    """One object per token: its text, logprob, UTF-8 bytes and top alternatives."""

    def top(token_id: int, logprob: float) -> ChatTopLogprob:
        text = texts(token_id)
        return ChatTopLogprob(token=text, logprob=_finite(logprob), bytes=list(text.encode()))

    out = []
    for token_id, step in zip(token_ids, steps, strict=False):
        chosen = top(token_id, step.logprob)
        out.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=[top(t.token_id, t.logprob)
                                                                         for t in step.top]))
    return out
