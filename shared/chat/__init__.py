"""Chat output parsing: generated token ids to OpenAI-style content, reasoning and tool-call deltas.

- `registry`: `TOOL_PARSERS` (deepseek_v3, deepseek_v31) and `REASONING_PARSERS` (deepseek_r1) by name;
- `detect`: which of them a tokenizer's model needs;
- `tool_parsers`, `reasoning`: the parsers; `output.ChatOutputParser` chains them for one response;
- `deltas`: what they yield, and how deltas add up to the complete message.

Nothing here imports torch; the parsers need only a tokenizer's `token_to_id` and `decode`.
"""

from moemesh.chat.deltas import (
    ContentDelta,
    Delta,
    ReasoningDelta,
    ToolCall,
    ToolCallArgs,
    ToolCallStart,
    accumulate,
)
from moemesh.chat.detect import detect_reasoning_parser, detect_tool_parser
from moemesh.chat.registry import REASONING_PARSERS, TOOL_PARSERS, make_reasoning_parser, make_tool_parser

__all__ = [
    "REASONING_PARSERS",
    "TOOL_PARSERS",
    "ContentDelta",
    "Delta",
    "ReasoningDelta",
    "ToolCall",
    "ToolCallArgs",
    "ToolCallStart",
    "accumulate",
    "detect_reasoning_parser",
    "detect_tool_parser",
    "make_reasoning_parser",
    "make_tool_parser",
]
