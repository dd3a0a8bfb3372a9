"""The chat output parsers by name, one registration line each, and how the gateway builds one.

Like every registry here (`moemesh.registry`), listing names imports no parser, so a CLI can offer
`--tool-call-parser {auto,deepseek_v3,deepseek_v31}` cheaply. "auto" asks `moemesh.chat.detect`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from moemesh.chat.tokens import TokenizerLike
from moemesh.registry import Registry

if TYPE_CHECKING:
    from moemesh.chat.reasoning import DeepSeekR1ReasoningParser
    from moemesh.chat.tool_parsers import DeepSeekToolParser

# Classes with `from_tokenizer(tokenizer, *, seed=None)`, subclasses of moemesh.chat.tool_parsers.DeepSeekToolParser.
TOOL_PARSERS = Registry("tool-call parser")
TOOL_PARSERS.register("deepseek_v3", "moemesh.chat.tool_parsers:DeepSeekV3ToolParser")  # V3, V3-0324, R1, R1-0528
TOOL_PARSERS.register("deepseek_v31", "moemesh.chat.tool_parsers:DeepSeekV31ToolParser")  # V3.1, V3.1-Terminus

# Classes with `from_tokenizer(tokenizer, *, prompt_ids=(), start_in_reasoning=None)`.
REASONING_PARSERS = Registry("reasoning parser")
REASONING_PARSERS.register("deepseek_r1", "moemesh.chat.reasoning:DeepSeekR1ReasoningParser")  # R1, R1-0528, V3.1

AUTO = "auto"
NONE = "none"
TOOL_PARSER_CHOICES = (AUTO, *TOOL_PARSERS.names())
REASONING_PARSER_CHOICES = (AUTO, *REASONING_PARSERS.names())
# What a server option takes: a parser, auto, or none (off).
TOOL_PARSER_OPTIONS = (*TOOL_PARSER_CHOICES, NONE)
REASONING_PARSER_OPTIONS = (*REASONING_PARSER_CHOICES, NONE)


def make_tool_parser(name: str, tokenizer: TokenizerLike, *, seed: int | None = None) -> DeepSeekToolParser | None:
    """Tool-call parser `name` (or the detected one, for "auto") for `tokenizer`; None when "auto" finds none.

    ValueError for an unknown name, or a named parser whose markers the tokenizer lacks.
    """
    from moemesh.chat.detect import detect_tool_parser

    chosen = detect_tool_parser(tokenizer) if name == AUTO else name
    return None if chosen is None else TOOL_PARSERS.load(chosen).from_tokenizer(tokenizer, seed=seed)


def make_reasoning_parser(name: str, tokenizer: TokenizerLike, *, prompt_ids: Sequence[int] = (),
                          start_in_reasoning: bool | None = None) -> DeepSeekR1ReasoningParser | None:
    """Reasoning parser `name` (or the detected one, for "auto") for one response to `prompt_ids`."""
    from moemesh.chat.detect import detect_reasoning_parser

    chosen = detect_reasoning_parser(tokenizer) if name == AUTO else name
    if chosen is None:
        return None
    return REASONING_PARSERS.load(chosen).from_tokenizer(
        tokenizer, prompt_ids=prompt_ids, start_in_reasoning=start_in_reasoning)
