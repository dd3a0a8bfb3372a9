"""DeepSeek-V3 and V3.1 tool-call parsing on realistic outputs: complete, and streamed split every way."""

from __future__ import annotations

import json
import re

import pytest

from moemesh.chat.deltas import Accumulated, ContentDelta, ToolCall, ToolCallArgs, ToolCallStart, accumulate
from moemesh.chat.tokens import TOOL_CALL_BEGIN as CALL
from moemesh.chat.tokens import TOOL_CALL_END as END
from moemesh.chat.tokens import TOOL_CALLS_BEGIN as CALLS
from moemesh.chat.tokens import TOOL_CALLS_END as CALLS_END
from moemesh.chat.tokens import TOOL_SEP as SEP
from moemesh.chat.tool_parsers import DeepSeekToolParser, DeepSeekV3ToolParser, DeepSeekV31ToolParser
from moemesh.model.tiny_tokenizer import EOS_TOKEN
from moemesh.model.tokenizer import Tokenizer
from tests.unit.chat.streaming import assert_every_chunking_agrees, run_stream

PARSERS: dict[str, type[DeepSeekToolParser]] = {"v3": DeepSeekV3ToolParser, "v31": DeepSeekV31ToolParser}


def v3_call(name: str, args: str) -> str:
    """One call as DeepSeek-V3's chat template writes it."""
    return f"{CALL}function{SEP}{name}\n```json\n{args}\n```{END}"


def v31_call(name: str, args: str) -> str:
    """One call as DeepSeek-V3.1's chat template writes it."""
    return f"{CALL}{name}{SEP}{args}{END}"


WEATHER = '{"location": "Beijing", "unit": "celsius"}'
WEATHER_PARIS = '{"location": "Paris", "unit": "celsius"}'
UTC = '{"tz": "UTC"}'
SEARCH = ('{"query": "café crème near the Louvre", "filters": {"price": {"max": 12.5, "currency": "€"}, '
          '"tags": ["naïve", "façade", "open late"], "rating": null}, "limit": 3}')
CODE = '{"command": "ls -la && echo `date`", "timeout": 30}'  # backticks inside the arguments

# (format, output, content, [(name, arguments)]): what DeepSeek models emit, and what it must parse to.
CASES = [
    pytest.param("v3", f"{CALLS}{v3_call('get_current_weather', WEATHER)}{CALLS_END}{EOS_TOKEN}",
                 None, [("get_current_weather", WEATHER)], id="v3-one-call"),
    pytest.param("v3", "I'll check the weather in both cities.\n\n"
                 f"{CALLS}{v3_call('get_current_weather', WEATHER)}\n"
                 f"{v3_call('get_current_weather', WEATHER_PARIS)}"
                 f"{CALLS_END}{EOS_TOKEN}",
                 "I'll check the weather in both cities.\n\n",
                 [("get_current_weather", WEATHER), ("get_current_weather", WEATHER_PARIS)],
                 id="v3-content-then-two-calls"),
    pytest.param("v3", f"{CALLS}{v3_call('search_restaurants', SEARCH)}\n{v3_call('run_shell', CODE)}{CALLS_END}",
                 None, [("search_restaurants", SEARCH), ("run_shell", CODE)], id="v3-nested-json-unicode-backticks"),
    pytest.param("v3", f"{CALLS}{CALL}function{SEP}get_time{END}{CALLS_END}", None, [("get_time", "{}")],
                 id="v3-call-without-arguments"),
    pytest.param("v3", "The capital of France is Paris. It has been since 987 — give or take.",
                 "The capital of France is Paris. It has been since 987 — give or take.", [], id="v3-no-calls"),
    pytest.param("v31", f"{CALLS}{v31_call('get_current_weather', WEATHER)}{CALLS_END}{EOS_TOKEN}",
                 None, [("get_current_weather", WEATHER)], id="v31-one-call"),
    pytest.param("v31", "Let me look that up.\n"
                 f"{CALLS}{v31_call('search_restaurants', SEARCH)}{v31_call('get_current_weather', WEATHER)}"
                 f"{CALLS_END}{EOS_TOKEN}",
                 "Let me look that up.\n", [("search_restaurants", SEARCH), ("get_current_weather", WEATHER)],
                 id="v31-content-then-two-calls"),
    pytest.param("v31", f"{CALLS}{v31_call('run_shell', CODE)}{CALLS_END}", None, [("run_shell", CODE)],
                 id="v31-backticks"),
    pytest.param("v31", f"{CALLS}{CALL}list_files{SEP}{END}{CALLS_END}", None, [("list_files", "{}")],
                 id="v31-call-without-arguments"),
    # -- malformed: never an exception; what cannot be read is content
    pytest.param("v3", f"Sure.{CALLS}{CALL}function{SEP}get_wea", f"Sure.{CALL}function{SEP}get_wea", [],
                 id="v3-stops-inside-the-name"),
    pytest.param("v3", f"{CALLS}{CALL}function{SEP}get_current_weather\n```json\n{{\"location\": \"Bei",
                 None, [("get_current_weather", '{"location": "Bei')], id="v3-stops-inside-the-arguments"),
    pytest.param("v3", f"{CALLS}{v3_call('get_current_weather', WEATHER)}", None,
                 [("get_current_weather", WEATHER)], id="v3-no-calls-end"),
    pytest.param("v3", f"{CALLS}", None, [], id="v3-only-the-begin-marker"),
    pytest.param("v3", f"Hi{CALL}function{SEP}get_time\n```json\n{{}}\n```{END} there", "Hi there",
                 [("get_time", "{}")], id="v3-call-without-calls-begin-and-text-after"),
    pytest.param("v3", f"{CALLS}{v3_call('a', '{}')} oops {v3_call('b', '{}')}{CALLS_END}", " oops ",
                 [("a", "{}"), ("b", "{}")], id="v3-text-between-calls"),
    pytest.param("v3", f"a{SEP}b{END}c{CALLS_END}d", "abcd", [], id="v3-stray-markers-in-content"),
    pytest.param("v3", f"{CALLS}{CALL}function get_time{END}{CALLS_END}", f"{CALL}function get_time", [],
                 id="v3-call-without-separator"),
    pytest.param("v3", f"{CALLS}{CALL}function{SEP}a\n```json\n{{\"x\": 1}}{SEP}\n```{CALL}function{SEP}b\n{{}}",
                 None, [("a", '{"x": 1}'), ("b", "{}")], id="v3-sep-in-arguments-and-call-cut-by-next"),
    pytest.param("v3", f"{CALLS}{CALL}function{SEP}f\n{{\"a\": 1}}{END}{CALLS_END}", None, [("f", '{"a": 1}')],
                 id="v3-arguments-without-fence"),
    pytest.param("v31", f"{CALLS}{CALL}get_weather{END}{CALLS_END}", f"{CALL}get_weather", [],
                 id="v31-call-without-separator"),
    pytest.param("v31", f"{CALLS}{CALL}{SEP}{{\"a\": 1}}{END}{CALLS_END}", f"{CALL}{SEP}{{\"a\": 1}}", [],
                 id="v31-call-without-name"),
    pytest.param("v31", f"{CALLS}{CALL}get_weather{SEP}{{\"location\": \"Be", None,
                 [("get_weather", '{"location": "Be')], id="v31-stops-inside-the-arguments"),
    pytest.param("v31", f"{CALLS}{CALL}get_wea", f"{CALL}get_wea", [], id="v31-stops-inside-the-name"),
]


def _expected(content: str | None, calls: list[tuple[str, str]], got: Accumulated) -> Accumulated:
    """`Accumulated` with the expected text and the ids the parser drew (ids are checked elsewhere)."""
    ids = [c.id for c in got.tool_calls]
    return Accumulated(None, content, [ToolCall(i, n, a) for i, (n, a) in zip(ids, calls, strict=False)])


@pytest.mark.parametrize(("fmt", "output", "content", "calls"), CASES)
def test_complete_and_every_split(chat_tok: Tokenizer, fmt: str, output: str, content: str | None,
                                  calls: list[tuple[str, str]]) -> None:
    ids = chat_tok.encode(output, add_special_tokens=False)
    parser = PARSERS[fmt].from_tokenizer(chat_tok, seed=7)
    result = parser.parse_complete(ids)
    complete = Accumulated(None, result.content, result.tool_calls)
    assert complete == _expected(content, calls, complete)
    for call in result.tool_calls:
        assert call.type == "function" and re.fullmatch(r"call_[0-9a-f]{24}", call.id)
    assert_every_chunking_agrees(lambda: PARSERS[fmt].from_tokenizer(chat_tok, seed=7), ids, complete)


CJK_ARGS = '{"city": "北京", "note": "明天有雨 🌧️", "nested": {"emoji": ["😀", "🎉"], "ok": true}}'


@pytest.mark.parametrize("fmt", ["v3", "v31"])
def test_multibyte_characters_split_across_tokens(byte_tok: Tokenizer, fmt: str) -> None:
    # One token per byte: every CJK character and emoji spans several tokens, and every split cuts some.
    call = v3_call if fmt == "v3" else v31_call
    output = f"好的，我来查一下。{CALLS}{call('get_weather', CJK_ARGS)}{CALLS_END}{EOS_TOKEN}"
    ids = byte_tok.encode(output, add_special_tokens=False)
    result = PARSERS[fmt].from_tokenizer(byte_tok, seed=1).parse_complete(ids)
    assert result.content == "好的，我来查一下。"
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("get_weather", CJK_ARGS)]
    assert json.loads(result.tool_calls[0].arguments)["nested"]["emoji"] == ["😀", "🎉"]
    assert_every_chunking_agrees(lambda: PARSERS[fmt].from_tokenizer(byte_tok, seed=1), ids,
                                 Accumulated(None, result.content, result.tool_calls))


@pytest.mark.parametrize("fmt", ["v3", "v31"])
def test_arguments_stream_as_they_are_generated(chat_tok: Tokenizer, fmt: str) -> None:
    call = v3_call if fmt == "v3" else v31_call
    ids = chat_tok.encode(f"{CALLS}{call('search_restaurants', SEARCH)}{CALLS_END}", add_special_tokens=False)
    end = ids.index(chat_tok.token_to_id(END))
    parser = PARSERS[fmt].from_tokenizer(chat_tok)
    deltas = []
    for token_id in ids[:end]:
        deltas.extend(parser.feed([token_id]))
    starts = [d for d in deltas if isinstance(d, ToolCallStart)]
    fragments = [d.arguments for d in deltas if isinstance(d, ToolCallArgs)]
    # The call is announced before its arguments end, which arrive in many fragments; all that is held
    # back when the end marker comes is V3's closing fence.
    assert [s.name for s in starts] == ["search_restaurants"] and len(fragments) > 10
    assert "".join(fragments) == SEARCH
    assert not any(isinstance(d, ToolCallArgs) for d in parser.feed(ids[end:]) + parser.finish())


def test_the_name_is_announced_once_complete(chat_tok: Tokenizer) -> None:
    text = f"{CALLS}{CALL}function{SEP}get_current_weather"
    parser = DeepSeekV3ToolParser.from_tokenizer(chat_tok)
    deltas = parser.feed(chat_tok.encode(text, add_special_tokens=False))
    assert deltas == []  # V3: the name may go on until the newline
    deltas = parser.feed(chat_tok.encode("\n```json\n{", add_special_tokens=False))
    assert isinstance(deltas[0], ToolCallStart) and deltas[0].name == "get_current_weather"
    assert deltas[1:] == [ToolCallArgs(0, "{")]
    parser = DeepSeekV31ToolParser.from_tokenizer(chat_tok)
    deltas = parser.feed(chat_tok.encode(f"{CALLS}{CALL}get_current_weather{SEP}", add_special_tokens=False))
    assert [type(d) for d in deltas] == [ToolCallStart]  # V3.1: at the separator


def test_call_ids(chat_tok: Tokenizer) -> None:
    ids = chat_tok.encode(f"{CALLS}{v31_call('a', '{}')}{v31_call('b', '{}')}{CALLS_END}", add_special_tokens=False)
    first = DeepSeekV31ToolParser.from_tokenizer(chat_tok, seed=3).parse_complete(ids).tool_calls
    again = DeepSeekV31ToolParser.from_tokenizer(chat_tok, seed=3).parse_complete(ids).tool_calls
    assert [c.id for c in first] == [c.id for c in again] and first[0].id != first[1].id
    unseeded = DeepSeekV31ToolParser.from_tokenizer(chat_tok)
    a, b = unseeded.parse_complete(ids).tool_calls, unseeded.parse_complete(ids).tool_calls
    assert {c.id for c in a}.isdisjoint(c.id for c in b)
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in a + b)


def test_markers_are_keyed_on_ids_not_text(chat_tok: Tokenizer, plain_tok: Tokenizer) -> None:
    # Text that spells the format without the marker tokens is plain content.
    spelled = f"{CALLS}{v31_call('get_weather', WEATHER)}{CALLS_END}"
    parser = DeepSeekV31ToolParser.from_tokenizer(chat_tok)
    ids = [t for t in chat_tok.encode(spelled, add_special_tokens=False)]
    as_text = [i for piece in spelled for i in chat_tok.encode(piece, add_special_tokens=False)
               if i not in parser._markers]  # the same characters, never as a marker id
    assert parser.parse_complete(ids).tool_calls and not parser.parse_complete(as_text).tool_calls
    with pytest.raises(ValueError, match=r"needs .*<｜tool▁calls▁begin｜>.* as single tokens"):
        DeepSeekV3ToolParser.from_tokenizer(plain_tok)


def test_finish_is_idempotent_and_openai_shapes(chat_tok: Tokenizer) -> None:
    parser = DeepSeekV3ToolParser.from_tokenizer(chat_tok, seed=0)
    ids = chat_tok.encode(f"Ok.{CALLS}{v3_call('get_time', UTC)}{CALLS_END}", add_special_tokens=False)
    deltas = run_stream(parser, [ids])
    assert parser.finish() == []
    chunks = [d.to_openai() for d in deltas]
    assert chunks[0] == {"content": "Ok."}
    start = deltas[1]
    assert chunks[1] == {"tool_calls": [{"index": 0, "id": start.id, "type": "function",
                                         "function": {"name": "get_time", "arguments": ""}}]}
    assert chunks[2] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"tz": "UTC"}'}}]}
    assert accumulate(deltas).tool_calls[0].to_openai() == {
        "id": start.id, "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}
    assert isinstance(deltas[0], ContentDelta)
