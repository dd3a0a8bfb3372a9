"""DeepSeek-R1's reasoning parser: the text up to `</think>` is reasoning_content, the rest is content.

R1's chat template opens `<think>\\n` in the prompt, so its output often has only the closing tag;
R1-0528 (and R1 with the older template) emits both, and the opening tag is stripped; V3.1 opens
`<think>` in thinking mode and closes `</think>` in the prompt otherwise. Where the output starts is
therefore read from the prompt when it is given (the last think tag in it wins) and is reasoning when
the prompt says nothing, as R1 needs.

Where `<think>` and `</think>` are single tokens (every DeepSeek vocabulary) the parser keys on their
ids; elsewhere it reads the decoded text and holds back a possible partial tag at the end of each delta
("</thi" waits for the next one). Either way a stream chunked anywhere parses to the same result, and
model output never raises. Only the first tag of each kind counts: `<think>` as the output's very first
token (or text), `</think>` while reasoning; later tags are passed through as text.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

from moemesh.chat.deltas import (
    ContentDelta,
    Delta,
    ReasoningDelta,
    ReasoningParseResult,
    accumulate,
    coalesce,
)
from moemesh.chat.text_stream import TextStream
from moemesh.chat.tokens import THINK_CLOSE, THINK_MARKERS, THINK_OPEN, Decode, TokenizerLike, decoder

# Prompt tokens searched for a think tag when the tags are text (a chat template puts it last).
_PROMPT_TAIL_TOKENS = 32


class Channel(enum.Enum):
    """Which part of the response a token belongs to."""

    REASONING = "reasoning_content"
    CONTENT = "content"


def _delta(channel: Channel, text: str) -> Delta:
    return ReasoningDelta(text) if channel is Channel.REASONING else ContentDelta(text)


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag` (what may still become it)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class DeepSeekR1ReasoningParser:
    """Splits one response into reasoning and content deltas: `feed` each chunk of ids, then `finish`."""

    name = "deepseek_r1"

    def __init__(self, token_ids: Mapping[str, int], decode: Decode, *, prompt_ids: Sequence[int] = (),
                 start_in_reasoning: bool | None = None) -> None:
        """`token_ids`: the ids of `<think>` and `</think>` when they are single tokens (else the text is read);
        `decode(ids) -> str`; `prompt_ids`: the prompt, to tell whether it left a think block open;
        `start_in_reasoning` overrides what the prompt says.
        """
        self._token_ids = dict(token_ids)
        self._open_id = token_ids.get(THINK_OPEN)
        self._close_id = token_ids.get(THINK_CLOSE)
        self._decode = decode
        self._prompt_ids = list(prompt_ids)
        self._start_override = start_in_reasoning
        if start_in_reasoning is None:
            opened = self.prompt_opens_reasoning(prompt_ids)
            start_in_reasoning = True if opened is None else opened
        self._channel = Channel.REASONING if start_in_reasoning else Channel.CONTENT
        self._started = False  # a token (ids) or a character (text) of output has been read
        # Keyed on ids: one text stream per channel. Keyed on text: one stream, then the tag scanner.
        self._streams = {Channel.REASONING: TextStream(decode), Channel.CONTENT: TextStream(decode)}
        self._text = TextStream(decode)
        self._emitting = self._channel  # the channel whose stream may still hold text back
        self._pending = ""  # text mode: text not yet assigned to a channel
        self._finished = False

    @classmethod
    def from_tokenizer(cls, tokenizer: TokenizerLike, *, prompt_ids: Sequence[int] = (),
                       start_in_reasoning: bool | None = None,
                       skip_special_tokens: bool = True) -> DeepSeekR1ReasoningParser:
        """A parser for `tokenizer`: keyed on the think tags' ids when both are single tokens."""
        ids = {tag: tokenizer.token_to_id(tag) for tag in THINK_MARKERS}
        return cls({t: i for t, i in ids.items() if i is not None}, decoder(tokenizer, skip_special_tokens),
                   prompt_ids=prompt_ids, start_in_reasoning=start_in_reasoning)

    def fresh(self) -> DeepSeekR1ReasoningParser:
        """A new parser with this one's settings (for the next response, or a complete parse)."""
        return type(self)(self._token_ids, self._decode, prompt_ids=self._prompt_ids,
                          start_in_reasoning=self._start_override)

    @property
    def keyed_on_ids(self) -> bool:
        """True when both tags are single tokens, so `split` can route ids (to a tool-call parser)."""
        return self._open_id is not None and self._close_id is not None

    @property
    def in_reasoning(self) -> bool:
        """Whether the output read so far is still inside the think block."""
        return self._channel is Channel.REASONING

    def prompt_opens_reasoning(self, prompt_ids: Sequence[int]) -> bool | None:
        """True when the prompt's last think tag opens a block, False when it closes one, None without one."""
        if not prompt_ids:
            return None
        if self.keyed_on_ids:
            for token_id in reversed(prompt_ids):
                if token_id in (self._open_id, self._close_id):
                    return token_id == self._open_id
            return None
        tail = self._decode(list(prompt_ids)[-_PROMPT_TAIL_TOKENS:])
        opened, closed = tail.rfind(THINK_OPEN), tail.rfind(THINK_CLOSE)
        return None if opened == closed == -1 else opened > closed

    # -- streaming

    def split(self, ids: Sequence[int]) -> list[tuple[Channel, list[int]]]:
        """Route ids to their channel, dropping the think tags; a new run starts at each channel switch
        (possibly empty, so the caller can close the previous channel). Needs `keyed_on_ids`.
        """
        if not self.keyed_on_ids:
            raise RuntimeError("split() needs <think> and </think> as single tokens; use feed() on text")
        runs: list[tuple[Channel, list[int]]] = [(self._channel, [])]
        for token_id in ids:
            first, self._started = not self._started, True
            if token_id == self._open_id and first:
                self._switch(Channel.REASONING, runs)
            elif token_id == self._close_id and self._channel is Channel.REASONING:
                self._switch(Channel.CONTENT, runs)
            else:
                runs[-1][1].append(token_id)
        return runs

    def feed(self, ids: Sequence[int]) -> list[Delta]:
        """Consume the next generated ids; returns reasoning and content deltas (often none)."""
        out: list[Delta] = []
        if self.keyed_on_ids:
            for channel, run in self.split(ids):
                if channel is not self._emitting:
                    out.append(_delta(self._emitting, self._streams[self._emitting].flush()))
                    self._emitting = channel
                out.append(_delta(channel, self._streams[channel].add(run)))
        else:
            self._scan(self._text.add(ids), final=False, out=out)
        return coalesce(out)

    def finish(self) -> list[Delta]:
        """Generation ended: whatever was held back (a partial tag is text after all)."""
        if self._finished:
            return []
        self._finished = True
        out: list[Delta] = []
        if self.keyed_on_ids:
            out.append(_delta(self._emitting, self._streams[self._emitting].flush()))
        else:
            self._scan(self._text.flush(), final=True, out=out)
        return coalesce(out)

    def parse_complete(self, ids: Sequence[int]) -> ReasoningParseResult:
        """Reasoning and content of a whole output; the same as accumulating `feed` + `finish`."""
        fresh = self.fresh()
        total = accumulate([*fresh.feed(ids), *fresh.finish()])
        return ReasoningParseResult(total.reasoning_content, total.content)

    def _switch(self, channel: Channel, runs: list[tuple[Channel, list[int]]]) -> None:
        self._channel = channel
        if runs[-1][1] or runs[-1][0] is not channel:
            runs.append((channel, []))

    def _scan(self, text: str, final: bool, out: list[Delta]) -> None:
        """Text mode: assign `text` (after what is pending) to channels, holding back a possible partial tag."""
        self._pending += text
        while True:
            if not self._started:
                if self._pending.startswith(THINK_OPEN):
                    self._pending = self._pending[len(THINK_OPEN):]
                    self._channel, self._started = Channel.REASONING, True
                    continue
                if THINK_OPEN.startswith(self._pending) and not final:
                    return  # nothing yet, or what may be the start of "<think>"
                self._started = True
            if self._channel is Channel.CONTENT:
                out.append(ContentDelta(self._pending))
                self._pending = ""
                return
            end = self._pending.find(THINK_CLOSE)
            if end >= 0:
                out.append(ReasoningDelta(self._pending[:end]))
                self._pending = self._pending[end + len(THINK_CLOSE):]
                self._channel = Channel.CONTENT
                continue
            keep = 0 if final else _partial_tag(self._pending, THINK_CLOSE)
            cut = len(self._pending) - keep
            out.append(ReasoningDelta(self._pending[:cut]))
            self._pending = self._pending[cut:]
            return
