"""What the chat parsers produce: streaming deltas, and the complete results they add up to.

A streaming parser turns each chunk of generated token ids into a list of deltas, in output order:

- `ContentDelta(text)`: assistant text, `choices[].delta.content` in OpenAI's stream;
- `ReasoningDelta(text)`: thinking text, `choices[].delta.reasoning_content` (DeepSeek's API field);
- `ToolCallStart(index, id, name)`: a new tool call, sent once, before any of its arguments;
- `ToolCallArgs(index, arguments)`: the next fragment of that call's arguments (a JSON text in pieces).

Joining every `ContentDelta` gives the complete content, and joining the `ToolCallArgs` of one index gives
that call's arguments string exactly: `accumulate(deltas)` does so, and equals the parser's `parse_complete`.
`to_openai()` on each delta gives the `delta` object of a `chat.completion.chunk`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple


@dataclass(frozen=True)
class ContentDelta:
    """Assistant text."""

    text: str

    def to_openai(self) -> dict[str, Any]:
        return {"content": self.text}


@dataclass(frozen=True)
class ReasoningDelta:
    """Thinking text (between `<think>` and `</think>`)."""

    text: str

    def to_openai(self) -> dict[str, Any]:
        return {"reasoning_content": self.text}


@dataclass(frozen=True)
class ToolCallStart:
    """A tool call begins: its position among this response's calls, its id and the function's name."""

    index: int
    id: str
    name: str
    type: str = "function"

    def to_openai(self) -> dict[str, Any]:
        # OpenAI's first chunk of a call carries an empty arguments string; clients append to it.
        return {"tool_calls": [{"index": self.index, "id": self.id, "type": self.type,
                                "function": {"name": self.name, "arguments": ""}}]}


@dataclass(frozen=True)
class ToolCallArgs:
    """The next piece of tool call `index`'s arguments."""

    index: int
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {"tool_calls": [{"index": self.index, "function": {"arguments": self.arguments}}]}


Delta = ContentDelta | ReasoningDelta | ToolCallStart | ToolCallArgs


@dataclass
class ToolCall:
    """One complete tool call; `arguments` is the model's JSON text, as generated (not re-serialized)."""

    id: str
    name: str
    arguments: str = ""
    type: str = "function"

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "function": {"name": self.name, "arguments": self.arguments}}


class ToolParseResult(NamedTuple):
    """A whole output split by a tool-call parser: content (None when there is none) and the calls."""

    content: str | None
    tool_calls: list[ToolCall]


class ReasoningParseResult(NamedTuple):
    """A whole output split by a reasoning parser; each part None when the output has none of it."""

    reasoning_content: str | None
    content: str | None


@dataclass
class Accumulated:
    """Deltas added up: what a client that joins the stream ends with."""

    reasoning_content: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


def accumulate(deltas: Iterable[Delta]) -> Accumulated:
    """Join `deltas` as an OpenAI client does (text appended, calls by index, argument fragments appended)."""
    out = Accumulated()
    calls: dict[int, ToolCall] = {}
    for delta in deltas:
        if isinstance(delta, ContentDelta):
            out.content = (out.content or "") + delta.text
        elif isinstance(delta, ReasoningDelta):
            out.reasoning_content = (out.reasoning_content or "") + delta.text
        elif isinstance(delta, ToolCallStart):
            calls[delta.index] = ToolCall(delta.id, delta.name, "", delta.type)
        else:
            calls[delta.index].arguments += delta.arguments
    out.tool_calls = [calls[i] for i in sorted(calls)]
    return out


def coalesce(deltas: Iterable[Delta]) -> list[Delta]:
    """Merge neighbours of one kind (text with text, fragments of one call) and drop empty ones.

    A chunk of several tokens then becomes one delta per kind instead of one per token.
    """
    out: list[Delta] = []
    for delta in deltas:
        if isinstance(delta, (ContentDelta, ReasoningDelta)):
            if not delta.text:
                continue
            if out and type(out[-1]) is type(delta):
                out[-1] = type(delta)(out[-1].text + delta.text)  # type: ignore[union-attr]
                continue
        elif isinstance(delta, ToolCallArgs):
            if not delta.arguments:
                continue
            last = out[-1] if out else None
            if isinstance(last, ToolCallArgs) and last.index == delta.index:
                out[-1] = ToolCallArgs(delta.index, last.arguments + delta.arguments)
                continue
        out.append(delta)
    return out
