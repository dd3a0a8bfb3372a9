"""Chat responses split by the model's output parsers: reasoning and tool calls taken out of the text.

At start-up, `ChatParsing.resolve` turns `--tool-call-parser` / `--reasoning-parser` (a registered name,
"auto" or "none") into the parsers this model needs, so that a parser the tokenizer cannot serve fails
the gateway's start, never a request. Per chat request, `for_request` gives a `ResponseParser` (None when
nothing is parsed: then responses pass through as the worker wrote them). The core runs it over the
request's whole stream, after migration bookkeeping, so REST and gRPC clients get the same split:

    text            content only (no think block, no tool-call markup)
    reasoning_text  the think block's text
    tool_calls      ToolCallDelta pieces: a call's id and name first, then fragments of its arguments

A request that emitted a tool call and stopped on its own finishes with FINISH_REASON_TOOL_CALLS (as
OpenAI's `finish_reason: "tool_calls"`); one cut by max_tokens keeps LENGTH, its arguments possibly cut.

With a parser on, the text comes from the token ids (the markers are tokens), not from the worker's
text; a matched stop string is then cut from the content at the end (`StopTrim`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from moemesh.chat.deltas import ContentDelta, Delta, ReasoningDelta, ToolCallArgs, ToolCallStart
from moemesh.chat.detect import detect_reasoning_parser, detect_tool_parser
from moemesh.chat.output import ChatOutputParser
from moemesh.chat.registry import AUTO, NONE, make_reasoning_parser, make_tool_parser
from moemesh.chat.registry import REASONING_PARSER_OPTIONS as REASONING_PARSER_CHOICES
from moemesh.chat.registry import TOOL_PARSER_OPTIONS as TOOL_CALL_PARSER_CHOICES
from moemesh.chat.tokens import TokenizerLike, decoder
from moemesh.v1 import common_pb2, gateway_pb2

log = logging.getLogger(__name__)



class ParserSetupError(ValueError):
    """A parser option this model's tokenizer cannot serve; the message names the option."""


@dataclass(frozen=True)
class ChatParsing:
    """The output parsers of the served model, chosen once: `tool_parser` / `reasoning_parser` are
    registered names or None (off)."""

    tokenizer: TokenizerLike
    tool_parser: str | None = None
    reasoning_parser: str | None = None

    @classmethod
    def resolve(cls, tokenizer: TokenizerLike, tool_call_parser: str = AUTO,
                reasoning_parser: str = AUTO) -> ChatParsing:
        """The parsers for the options; "auto" detects from the tokenizer (None when it finds none).

        Raises ParserSetupError for an unknown name or a parser whose tokens the tokenizer lacks.
        """
        for option, value, choices in (("--tool-call-parser", tool_call_parser, TOOL_CALL_PARSER_CHOICES),
                                       ("--reasoning-parser", reasoning_parser, REASONING_PARSER_CHOICES)):
            if value not in choices:
                raise ParserSetupError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
        tool = None if tool_call_parser == NONE else (
            detect_tool_parser(tokenizer) if tool_call_parser == AUTO else tool_call_parser)
        reasoning = None if reasoning_parser == NONE else (
            detect_reasoning_parser(tokenizer) if reasoning_parser == AUTO else reasoning_parser)
        try:  # build each once: a tokenizer without the parser's tokens fails here
            if tool:
                make_tool_parser(tool, tokenizer)
            if reasoning:
                make_reasoning_parser(reasoning, tokenizer)
        except ValueError as exc:
            raise ParserSetupError(f"{exc} (choose another parser or 'none')") from None
        parsing = cls(tokenizer, tool, reasoning)
        if tool and reasoning:
            try:  # both at once need the think tags as tokens: check now, not on the first request
                parsing._output_parser((), tools=True)
            except ValueError as exc:
                raise ParserSetupError(f"--tool-call-parser {tool} with --reasoning-parser {reasoning}: {exc}") \
                    from None
        return parsing

    def for_request(self, prompt_token_ids: Sequence[int], tools: bool,
                    sampling: common_pb2.SamplingParams | None = None) -> ResponseParser | None:
        """The parser of one chat response (`tools`: the request has tools and tool_choice is not none;
        `sampling`: its stop strings are applied to the parsed text); None when nothing is to be parsed."""
        use_tools = tools and self.tool_parser is not None
        if not use_tools and self.reasoning_parser is None:
            return None
        stop = StopTrim(sampling.stop, sampling.include_stop_str_in_output) if sampling and sampling.stop else None
        return ResponseParser(self._output_parser(prompt_token_ids, tools=use_tools), stop)

    def _output_parser(self, prompt_token_ids: Sequence[int], tools: bool) -> ChatOutputParser:
        tool = make_tool_parser(self.tool_parser, self.tokenizer) if tools and self.tool_parser else None
        reasoning = make_reasoning_parser(self.reasoning_parser, self.tokenizer, prompt_ids=prompt_token_ids) \
            if self.reasoning_parser else None
        return ChatOutputParser(decoder(self.tokenizer), reasoning=reasoning, tools=tool)

    def describe(self) -> str:
        """For the start-up log line."""
        return f"tool-call parser {self.tool_parser or 'none'}, reasoning parser {self.reasoning_parser or 'none'}"


class ResponseParser:
    """One chat response's stream rewritten: `apply` each GenerateResponse in order."""

    def __init__(self, parser: ChatOutputParser, stop: StopTrim | None = None) -> None:
        """`stop`: the request's stop strings, when it has some (their text is cut as the worker cuts it)."""
        self._parser = parser
        self._stop = stop
        self._called_tools = False

    def resume(self, token_ids: Sequence[int]) -> None:
        """Read the tokens a resumed request's client already has (its stream broke at another gateway, whose
        parser had read them and sent what they completed), dropping what comes out: the next `apply` goes on
        where that stream stopped, inside a think block or a tool call alike."""
        self.apply(gateway_pb2.GenerateResponse(token_ids=token_ids))

    def apply(self, response: gateway_pb2.GenerateResponse) -> gateway_pb2.GenerateResponse:
        """`response` with its text split into content, reasoning and tool-call pieces."""
        deltas = self._parser.feed(list(response.token_ids))
        last = bool(response.finish_reason)
        if last:
            deltas += self._parser.finish()
        if self._stop is not None:
            stopped_on = response.stop_string if response.WhichOneof("stop_reason") == "stop_string" else None
            deltas = self._stop.apply(deltas, last, stopped_on)
        out = gateway_pb2.GenerateResponse()
        out.CopyFrom(response)
        out.text = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
        out.reasoning_text = "".join(d.text for d in deltas if isinstance(d, ReasoningDelta))
        del out.tool_calls[:]
        for d in deltas:
            if isinstance(d, ToolCallStart):
                self._called_tools = True
                out.tool_calls.add(index=d.index, id=d.id, name=d.name)
            elif isinstance(d, ToolCallArgs):
                out.tool_calls.add(index=d.index, arguments=d.arguments)
        if last and self._called_tools and response.finish_reason == common_pb2.FINISH_REASON_STOP:
            out.finish_reason = common_pb2.FINISH_REASON_TOOL_CALLS
        return out


class StopTrim:
    """Stop strings applied to parsed text: text that may begin a stop string is held back (as the worker
    holds it back), and at the end the matched one and what follows it are cut.

    The worker stops at a stop string in its text and cuts it, but the token ids still hold it; parsed
    text comes from the ids, so it is cut here again. Per channel (content, reasoning): a stop string
    across a think tag or a tool-call marker is not cut.
    """

    def __init__(self, stops: Sequence[str], keep_matched: bool) -> None:
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._keep = keep_matched
        self._held: dict[type[ContentDelta | ReasoningDelta], str] = {ContentDelta: "", ReasoningDelta: ""}

    def apply(self, deltas: list[Delta], last: bool, stopped_on: str | None) -> list[Delta]:
        """`deltas` of one response with text held back, or on the `last` one released and cut."""
        out: list[Delta] = []
        for d in deltas:
            if not isinstance(d, (ContentDelta, ReasoningDelta)):
                out.append(d)
                continue
            text = self._held[type(d)] + d.text
            keep = 0 if last else min(self._hold, len(text))
            self._held[type(d)] = text[len(text) - keep:]
            out.append(type(d)(text[:len(text) - keep]))
        if last:
            out += [kind(text) for kind, text in self._held.items() if text]
            self._held = dict.fromkeys(self._held, "")
            out = [self._cut(d, stopped_on) for d in out]
        return [d for d in out if not isinstance(d, (ContentDelta, ReasoningDelta)) or d.text]

    def _cut(self, d: Delta, stop: str | None) -> Delta:
        if not stop or not isinstance(d, (ContentDelta, ReasoningDelta)):
            return d
        at = d.text.find(stop)
        if at < 0:
            return d
        return type(d)(d.text[:at + len(stop)] if self._keep else d.text[:at])
