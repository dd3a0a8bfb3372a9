"""The gateway's chat output parsing: parsers chosen at start-up, responses split, stop strings cut."""

from __future__ import annotations

import json

import pytest

from moemesh.chat import tokens as t
from moemesh.chat.deltas import ContentDelta, ReasoningDelta, ToolCallArgs
from moemesh.model.tiny_tokenizer import build_tiny_tokenizer
from moemesh.model.tokenizer import Tokenizer
from moemesh.services.gateway.chat_output import ChatParsing, ParserSetupError, StopTrim
from moemesh.v1 import common_pb2, gateway_pb2


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    out = tmp_path_factory.mktemp("chat")
    build_tiny_tokenizer(out, 1024, chat_tokens=True)
    return Tokenizer.from_dir(out)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    out = tmp_path_factory.mktemp("plain")
    build_tiny_tokenizer(out, 1024)
    return Tokenizer.from_dir(out)


def _responses(tok: Tokenizer, text: str, chunk: int, finish: int = common_pb2.FINISH_REASON_STOP,
               stop_string: str | None = None) -> list[gateway_pb2.GenerateResponse]:
    ids = tok.encode(text, add_special_tokens=False)
    out = [gateway_pb2.GenerateResponse(token_ids=ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    out[-1].finish_reason = finish
    if stop_string is not None:
        out[-1].stop_string = stop_string
    return out


def _run(parsing: ChatParsing, responses: list[gateway_pb2.GenerateResponse], tools: bool = True,
         sampling: common_pb2.SamplingParams | None = None) -> dict:
    parser = parsing.for_request([], tools, sampling)
    assert parser is not None
    out = [parser.apply(r) for r in responses]
    calls: dict[int, dict] = {}
    for r in out:
        for piece in r.tool_calls:
            if piece.name:
                calls[piece.index] = {"id": piece.id, "name": piece.name, "arguments": ""}
            calls[piece.index]["arguments"] += piece.arguments
    return {"text": "".join(r.text for r in out), "reasoning": "".join(r.reasoning_text for r in out),
            "calls": [calls[i] for i in sorted(calls)], "finish": out[-1].finish_reason,
            "token_ids": [i for r in out for i in r.token_ids]}


def test_resolve_detects_names_and_refuses_what_the_tokenizer_cannot_serve(tok: Tokenizer, plain: Tokenizer) -> None:
    assert ChatParsing.resolve(tok).tool_parser == "deepseek_v3"
    assert ChatParsing.resolve(tok).reasoning_parser is None  # the tiny template never writes <think>
    assert ChatParsing.resolve(plain).tool_parser is None
    assert ChatParsing.resolve(tok, "none", "deepseek_r1") == ChatParsing(tok, None, "deepseek_r1")
    with pytest.raises(ParserSetupError, match="lacks them"):
        ChatParsing.resolve(plain, "deepseek_v31")
    with pytest.raises(ParserSetupError, match="--reasoning-parser must be one of"):
        ChatParsing.resolve(tok, reasoning_parser="qwen3")
    assert ChatParsing.resolve(plain).for_request([1, 2], tools=True) is None  # nothing to parse: pass-through


@pytest.mark.parametrize("chunk", [1, 2, 5, 100])
def test_reasoning_then_tool_calls_any_chunking(tok: Tokenizer, chunk: int) -> None:
    parsing = ChatParsing.resolve(tok, "deepseek_v3", "deepseek_r1")
    text = (f"think{t.THINK_CLOSE}Sure.{t.TOOL_CALLS_BEGIN}{t.TOOL_CALL_BEGIN}function{t.TOOL_SEP}f\n```json\n"
            f'{{"a": 1}}\n```{t.TOOL_CALL_END}{t.TOOL_CALLS_END}')
    result = _run(parsing, _responses(tok, text, chunk))
    assert (result["reasoning"], result["text"]) == ("think", "Sure.")
    assert [(c["name"], json.loads(c["arguments"])) for c in result["calls"]] == [("f", {"a": 1})]
    assert result["finish"] == common_pb2.FINISH_REASON_TOOL_CALLS
    assert result["token_ids"] == tok.encode(text, add_special_tokens=False)  # ids pass through untouched
    # Cut by max_tokens: the call stays a call, the finish reason stays length.
    cut = _run(parsing, _responses(tok, text[:-30], chunk, finish=common_pb2.FINISH_REASON_LENGTH))
    assert cut["finish"] == common_pb2.FINISH_REASON_LENGTH and cut["calls"][0]["name"] == "f"
    # tools off (tool_choice none, or no tools): markup is content, reasoning still split
    off = _run(parsing, _responses(tok, text, chunk), tools=False)
    assert off["calls"] == [] and t.TOOL_SEP in off["text"] and off["finish"] == common_pb2.FINISH_REASON_STOP


def test_stop_trim_holds_back_and_cuts() -> None:
    trim = StopTrim(["STOP"], keep_matched=False)
    assert trim.apply([ContentDelta("abcdef")], last=False, stopped_on=None) == [ContentDelta("abc")]
    assert trim.apply([ReasoningDelta("xy"), ToolCallArgs(0, "{}")], last=False, stopped_on=None) == \
        [ToolCallArgs(0, "{}")]  # "xy" may begin a stop string: held
    out = trim.apply([ContentDelta("ghSTOPij")], last=True, stopped_on="STOP")
    assert out == [ContentDelta("defgh"), ReasoningDelta("xy")]
    keep = StopTrim(["STOP", "XY"], keep_matched=True)
    assert keep.apply([ContentDelta("aSTOPb")], last=True, stopped_on="STOP") == [ContentDelta("aSTOP")]


def test_parsed_stop_strings_match_the_workers_cut(tok: Tokenizer) -> None:
    parsing = ChatParsing.resolve(tok, "none", "deepseek_r1")
    sampling = common_pb2.SamplingParams(stop=["END"])
    result = _run(parsing, _responses(tok, f"r{t.THINK_CLOSE}answer END", 1, stop_string="END"),
                  sampling=sampling)
    assert (result["reasoning"], result["text"]) == ("r", "answer ")


def test_a_resumed_parser_goes_on_where_the_broken_stream_stopped(tok: Tokenizer) -> None:
    parsing = ChatParsing.resolve(tok, "deepseek_v3", "deepseek_r1")
    text = (f"let me think{t.THINK_CLOSE}Sure, {t.TOOL_CALLS_BEGIN}{t.TOOL_CALL_BEGIN}function{t.TOOL_SEP}f\n```json\n"
            f'{{"a": [1, 2]}}\n```{t.TOOL_CALL_END}{t.TOOL_CALLS_END}')
    responses = _responses(tok, text, 1)

    def pieces(out: list[gateway_pb2.GenerateResponse]) -> list[tuple]:
        # Call ids are drawn per call: a call that starts after the break gets a new one, which no client saw.
        return [(r.text, r.reasoning_text, [(c.index, c.name, c.arguments) for c in r.tool_calls], r.finish_reason)
                for r in out]

    full = parsing.for_request([], tools=True)
    whole = pieces([full.apply(r) for r in responses])
    for k in range(1, len(responses)):  # the stream broke after k tokens, in the think block, the text or a call
        resumed = parsing.for_request([], tools=True)
        resumed.resume([i for r in responses[:k] for i in r.token_ids])
        assert pieces([resumed.apply(r) for r in responses[k:]]) == whole[k:], k
