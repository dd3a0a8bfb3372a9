"""One response's generated ids to OpenAI deltas: reasoning first, then content with tool calls.

The gateway needs a single object per choice whatever the model does: `ChatOutputParser` chains a
reasoning parser (optional) and a tool-call parser (optional). The reasoning parser routes token ids
(`split`), so the tool-call parser still sees ids after `</think>`: R1-0528 and V3.1 call tools after
thinking. With neither parser it is a plain incremental detokenizer emitting content deltas.
"""

from __future__ import annotations

from collections.abc import Sequence

from moemesh.chat.deltas import Accumulated, ContentDelta, Delta, ReasoningDelta, accumulate, coalesce
from moemesh.chat.reasoning import Channel, DeepSeekR1ReasoningParser
from moemesh.chat.text_stream import TextStream
from moemesh.chat.tokens import Decode
from moemesh.chat.tool_parsers import DeepSeekToolParser


class ChatOutputParser:
    """`feed` each chunk of generated ids, then `finish`; `parse_complete` reads a whole output."""

    def __init__(self, decode: Decode, *, reasoning: DeepSeekR1ReasoningParser | None = None,
                 tools: DeepSeekToolParser | None = None) -> None:
        """ValueError when both parsers are given but the think tags are not single tokens: the tool-call
        parser needs the ids of the content, which a text-keyed reasoning parser cannot route."""
        if reasoning is not None and tools is not None and not reasoning.keyed_on_ids:
            raise ValueError("tool calls after reasoning need <think> and </think> as single tokens")
        self._decode = decode
        self._reasoning = reasoning
        self._tools = tools
        self._stream = TextStream(decode)  # reasoning text when both parsers run; else content text

    def fresh(self) -> ChatOutputParser:
        """A new parser with the same settings and fresh state."""
        return ChatOutputParser(self._decode, reasoning=self._reasoning.fresh() if self._reasoning else None,
                                tools=self._tools.fresh() if self._tools else None)

    def feed(self, ids: Sequence[int]) -> list[Delta]:
        """Consume the next generated ids; returns the deltas they complete (often none)."""
        if self._tools is None:
            return self._reasoning.feed(ids) if self._reasoning else coalesce([ContentDelta(self._stream.add(ids))])
        if self._reasoning is None:
            return self._tools.feed(ids)
        out: list[Delta] = []
        for channel, run in self._reasoning.split(ids):
            if channel is Channel.REASONING:
                out.append(ReasoningDelta(self._stream.add(run)))
                continue
            self._close_reasoning(out)
            out.extend(self._tools.feed(run))
        return coalesce(out)

    def finish(self) -> list[Delta]:
        """Generation ended: flush every part."""
        if self._tools is None:
            return self._reasoning.finish() if self._reasoning else coalesce([ContentDelta(self._stream.flush())])
        out: list[Delta] = []
        if self._reasoning is not None:
            self._close_reasoning(out)
        out.extend(self._tools.finish())
        return coalesce(out)

    def parse_complete(self, ids: Sequence[int]) -> Accumulated:
        """Reasoning, content and tool calls of a whole output, as accumulating `feed` + `finish` gives."""
        fresh = self.fresh()
        return accumulate([*fresh.feed(ids), *fresh.finish()])

    def _close_reasoning(self, out: list[Delta]) -> None:
        # Reasoning text held back (a partial character) goes out before any content; flushing twice is harmless.
        out.append(ReasoningDelta(self._stream.flush()))
