"""DeepSeek's chat marker tokens, and the little a parser needs from a tokenizer.

The markers are single tokens in DeepSeek-V3/R1/V3.1 vocabularies (ids 128798 and up), so the parsers key
on their ids: a marker can never be split across two streamed chunks, and text that merely spells a
marker (a user quoting the format back) is never mistaken for one. The same strings are added to the tiny
test tokenizer by `moemesh.model.tiny_tokenizer.build_tiny_tokenizer(..., chat_tokens=True)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
# Tool results in the prompt (`role: tool` messages); the model never has to emit them, the template does.
TOOL_OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
TOOL_OUTPUTS_END = "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
TOOL_OUTPUT_END = "<｜tool▁output▁end｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# What a model emits to call tools, in the order the formats use them.
TOOL_CALL_MARKERS = (TOOL_CALLS_BEGIN, TOOL_CALL_BEGIN, TOOL_SEP, TOOL_CALL_END, TOOL_CALLS_END)
TOOL_OUTPUT_MARKERS = (TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END)
THINK_MARKERS = (THINK_OPEN, THINK_CLOSE)
# Every chat token, in the order DeepSeek's vocabulary lists them after its own specials.
CHAT_TOKENS = (*THINK_MARKERS, *TOOL_CALL_MARKERS, *TOOL_OUTPUT_MARKERS)

Decode = Callable[[Sequence[int]], str]


class TokenizerLike(Protocol):
    """What the parsers use of `moemesh.model.tokenizer.Tokenizer` (or of a `transformers` tokenizer)."""

    def token_to_id(self, token: str) -> int | None: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


def single_token_ids(tokenizer: TokenizerLike, tokens: Sequence[str]) -> dict[str, int] | None:
    """The id of each of `tokens`, or None unless every one is a single token of `tokenizer`."""
    ids = {}
    for token in tokens:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            return None
        ids[token] = token_id
    return ids


def decoder(tokenizer: TokenizerLike, skip_special_tokens: bool = True) -> Decode:
    """`tokenizer.decode` as the `decode(ids) -> str` callable the parsers take."""
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def require_ids(token_ids: Mapping[str, int], tokens: Sequence[str], who: str) -> dict[str, int]:
    """The ids of `tokens` from `token_ids`; ValueError naming the missing ones (a setup error, not model output)."""
    missing = [t for t in tokens if token_ids.get(t) is None]
    if missing:
        raise ValueError(f"{who} needs {', '.join(missing)} as single tokens; this tokenizer lacks them")
    return {t: token_ids[t] for t in tokens}
