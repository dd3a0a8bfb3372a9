"""One response through `ChatOutputParser`: thinking, then content and tool calls (R1-0528, V3.1)."""

from __future__ import annotations

import pytest

from moemesh.chat.deltas import Accumulated, ContentDelta, ToolCall
from moemesh.chat.output import ChatOutputParser
from moemesh.chat.reasoning import DeepSeekR1ReasoningParser
from moemesh.chat.tokens import (
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_SEP,
    decoder,
)
from moemesh.chat.tool_parsers import DeepSeekV3ToolParser, DeepSeekV31ToolParser
from moemesh.model.tiny_tokenizer import EOS_TOKEN
from moemesh.model.tokenizer import Tokenizer
from tests.unit.chat.streaming import assert_every_chunking_agrees

THINKING = "\nThe user wants the weather in Paris. I should call get_weather with the city.\n"
ARGS = '{"city": "Paris", "days": 2, "units": {"temp": "°C"}}'
R1_0528 = (f"{THINK_OPEN}{THINKING}{THINK_CLOSE}\n\n{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}function{TOOL_SEP}get_weather"
           f"\n```json\n{ARGS}\n```{TOOL_CALL_END}{TOOL_CALLS_END}{EOS_TOKEN}")
V31_THINKING = (f"{THINKING}{THINK_CLOSE}Let me check.{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}get_weather{TOOL_SEP}{ARGS}"
                f"{TOOL_CALL_END}{TOOL_CALLS_END}{EOS_TOKEN}")


@pytest.mark.parametrize(("output", "tools", "content"), [
    pytest.param(R1_0528, DeepSeekV3ToolParser, "\n\n", id="r1-0528"),
    pytest.param(V31_THINKING, DeepSeekV31ToolParser, "Let me check.", id="v31-thinking"),
])
def test_reasoning_then_tool_calls(chat_tok: Tokenizer, output: str, tools: type, content: str) -> None:
    ids = chat_tok.encode(output, add_special_tokens=False)

    def make() -> ChatOutputParser:
        return ChatOutputParser(decoder(chat_tok), reasoning=DeepSeekR1ReasoningParser.from_tokenizer(chat_tok),
                                tools=tools.from_tokenizer(chat_tok, seed=5))

    result = make().parse_complete(ids)
    call_id = result.tool_calls[0].id
    assert result == Accumulated(THINKING, content, [ToolCall(call_id, "get_weather", ARGS)])
    assert_every_chunking_agrees(make, ids, result)


def test_each_part_alone(chat_tok: Tokenizer, plain_tok: Tokenizer) -> None:
    ids = chat_tok.encode(f"a{THINK_CLOSE}b", add_special_tokens=False)
    plain = ChatOutputParser(decoder(chat_tok))
    assert plain.parse_complete(ids) == Accumulated(None, f"a{THINK_CLOSE}b")
    assert plain.feed(ids[:1]) == [ContentDelta("a")]
    only_reasoning = ChatOutputParser(decoder(chat_tok), reasoning=DeepSeekR1ReasoningParser.from_tokenizer(chat_tok))
    assert only_reasoning.parse_complete(ids) == Accumulated("a", "b")
    only_tools = ChatOutputParser(decoder(chat_tok), tools=DeepSeekV3ToolParser.from_tokenizer(chat_tok))
    assert only_tools.parse_complete(ids) == Accumulated(None, f"a{THINK_CLOSE}b")
    with pytest.raises(ValueError, match="single tokens"):
        ChatOutputParser(decoder(plain_tok), reasoning=DeepSeekR1ReasoningParser.from_tokenizer(plain_tok),
                         tools=DeepSeekV3ToolParser.from_tokenizer(chat_tok))
