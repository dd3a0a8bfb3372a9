"""DeepSeek tool-call parsers: generated token ids in, OpenAI-style content and tool-call deltas out.

The two formats (DeepSeek-V3's chat template, used by V3/V3-0324/R1/R1-0528; DeepSeek-V3.1's), where
CALLS, CALL, SEP, END, CALLS_END are `<｜tool▁calls▁begin｜>`, `<｜tool▁call▁begin｜>`, `<｜tool▁sep｜>`,
`<｜tool▁call▁end｜>` and `<｜tool▁calls▁end｜>`:

    V3:   CONTENT CALLS CALL function SEP NAME \\n ```json \\n ARGS \\n ``` END \\n CALL ... END CALLS_END
    V3.1: CONTENT CALLS CALL NAME SEP ARGS END CALL ... END CALLS_END

The markers are single tokens, and the parser keys on their ids: the ids between two markers are decoded
as one run (`TextStream`), so the result is the same however the stream is chunked. A call is announced
(`ToolCallStart`) as soon as its name is complete (V3: at the newline after it; V3.1: at the separator)
and its arguments follow fragment by fragment (`ArgumentsStream`).

Model output never makes a parser raise. What cannot be read comes back as content: a call cut off
before its name was complete (generation stopped, or another marker came first) is returned verbatim from
its `<｜tool▁call▁begin｜>` on, markers written as their token text; text inside the calls block but
outside any call is content unless it is only whitespace (V3 puts a newline between calls). A call already
announced stays a call when generation stops inside its arguments: they are sent as far as they came, as
OpenAI does when max_tokens cuts a call short. Stray markers (a separator inside arguments, an end marker
outside a call) are dropped.
"""

from __future__ import annotations

import enum
import random
import secrets
from collections.abc import Iterator, Mapping, Sequence

from moemesh.chat.args_stream import ArgumentsStream
from moemesh.chat.deltas import (
    ContentDelta,
    Delta,
    ToolCallArgs,
    ToolCallStart,
    ToolParseResult,
    accumulate,
    coalesce,
)
from moemesh.chat.text_stream import TextStream
from moemesh.chat.tokens import (
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALL_MARKERS,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_SEP,
    Decode,
    TokenizerLike,
    decoder,
    require_ids,
    single_token_ids,
)


class _State(enum.Enum):
    CONTENT = "content"  # outside the calls block
    BLOCK = "block"  # inside the calls block, between calls
    HEAD = "head"  # inside a call, its name not complete yet
    ARGS = "args"  # inside an announced call, streaming its arguments


class DeepSeekToolParser:
    """The state machine both formats share; subclasses say how a call's head gives its name.

    One parser per response: `feed` each chunk of generated ids as it comes, then `finish` once.
    `parse_complete(ids)` reads a whole output (with a fresh parser of the same settings).
    """

    name = "deepseek"

    def __init__(self, token_ids: Mapping[str, int], decode: Decode, *, seed: int | None = None) -> None:
        """`token_ids`: the id of each marker (`moemesh.chat.tokens.TOOL_CALL_MARKERS`); `decode(ids) -> str`
        decodes the ids between markers; `seed` makes the call ids deterministic (tests, replays).

        ValueError when a marker has no id: a setup error, never one of model output.
        """
        self._token_ids = require_ids(token_ids, TOOL_CALL_MARKERS, f"the {self.name} tool-call parser")
        self._markers = {token_id: token for token, token_id in self._token_ids.items()}
        self._decode = decode
        self._seed = seed
        self._random = random.Random(seed) if seed is not None else None
        self._state = _State.CONTENT
        self._stream = TextStream(decode)
        self._calls = 0  # calls announced so far: the next one's index
        self._between = ""  # BLOCK: text between calls
        self._head = ""  # HEAD: text since the last marker of the head
        self._raw: list[str] = []  # HEAD: the call verbatim, given back as content if it fails
        self._sep_seen = False  # HEAD: the separator came
        self._args = ArgumentsStream()
        self._finished = False

    @classmethod
    def from_tokenizer(cls, tokenizer: TokenizerLike, *, seed: int | None = None,
                       skip_special_tokens: bool = True) -> DeepSeekToolParser:
        """A parser for `tokenizer`'s marker ids, decoding with `tokenizer.decode`."""
        ids = single_token_ids(tokenizer, TOOL_CALL_MARKERS) or {}
        return cls(ids, decoder(tokenizer, skip_special_tokens), seed=seed)

    # -- the public interface

    def feed(self, ids: Sequence[int]) -> list[Delta]:
        """Consume the next generated ids; returns the deltas they complete (often none)."""
        out: list[Delta] = []
        for run, marker in self._runs(ids):
            if run:
                self._on_text(self._stream.add(run), out)
            if marker is not None:
                self._end_run(out)
                self._on_marker(marker, out)
        return coalesce(out)

    def finish(self) -> list[Delta]:
        """Generation ended: flush what was held back and close or give back an unfinished call."""
        if self._finished:
            return []
        self._finished = True
        out: list[Delta] = []
        self._end_run(out)
        if self._state is _State.BLOCK:
            self._flush_between(out)
        elif self._state is _State.HEAD:
            self._close_head(out, name_complete=False)
        elif self._state is _State.ARGS:
            out.append(ToolCallArgs(self._calls - 1, self._args.finish()))
        self._state = _State.CONTENT
        return coalesce(out)

    def fresh(self) -> DeepSeekToolParser:
        """A new parser with this one's settings (the same seed gives the same call ids)."""
        return type(self)(self._token_ids, self._decode, seed=self._seed)

    def parse_complete(self, ids: Sequence[int]) -> ToolParseResult:
        """Content and tool calls of a whole output; the same as accumulating `feed` + `finish`."""
        fresh = self.fresh()
        total = accumulate([*fresh.feed(ids), *fresh.finish()])
        return ToolParseResult(total.content, total.tool_calls)

    # -- the state machine

    def _runs(self, ids: Sequence[int]) -> Iterator[tuple[list[int], str | None]]:
        """`ids` cut at markers: (ids before a marker, the marker), then (the rest, None)."""
        run: list[int] = []
        for token_id in ids:
            marker = self._markers.get(token_id)
            if marker is None:
                run.append(token_id)
            else:
                yield run, marker
                run = []
        yield run, None

    def _end_run(self, out: list[Delta]) -> None:
        self._on_text(self._stream.flush(), out)
        self._stream = TextStream(self._decode)

    def _on_text(self, text: str, out: list[Delta]) -> None:
        if not text:
            return
        if self._state is _State.CONTENT:
            out.append(ContentDelta(text))
        elif self._state is _State.BLOCK:
            self._between += text
        elif self._state is _State.HEAD:
            self._head += text
            self._raw.append(text)
            if self._sep_seen:
                self._head_text_after_sep(text, out)
        else:
            out.append(ToolCallArgs(self._calls - 1, self._args.push(text)))

    def _on_marker(self, marker: str, out: list[Delta]) -> None:
        state = self._state
        if marker == TOOL_CALLS_BEGIN:
            if state is _State.CONTENT:
                self._enter_block()
        elif marker == TOOL_CALL_BEGIN:
            self._leave_call_or_block(out)
            self._state, self._head, self._raw, self._sep_seen = _State.HEAD, "", [marker], False
        elif marker == TOOL_SEP:
            if state is _State.HEAD:
                self._raw.append(marker)
                if not self._sep_seen:
                    self._sep_seen = True
                    self._on_separator(out)
        elif marker == TOOL_CALL_END:
            if state in (_State.HEAD, _State.ARGS):
                self._leave_call_or_block(out)
                self._enter_block()
        elif marker == TOOL_CALLS_END:
            if state is not _State.CONTENT:
                self._leave_call_or_block(out)
                self._state = _State.CONTENT

    def _enter_block(self) -> None:
        self._state, self._between = _State.BLOCK, ""

    def _leave_call_or_block(self, out: list[Delta]) -> None:
        """Close whatever is open (a call, or the gap between calls) before a marker moves on."""
        if self._state is _State.BLOCK:
            self._flush_between(out)
        elif self._state is _State.HEAD:
            self._close_head(out, name_complete=True)
        elif self._state is _State.ARGS:
            out.append(ToolCallArgs(self._calls - 1, self._args.finish()))
        self._state = _State.BLOCK

    def _flush_between(self, out: list[Delta]) -> None:
        if self._between.strip():
            out.append(ContentDelta(self._between))
        self._between = ""

    def _announce(self, name: str, out: list[Delta]) -> None:
        out.append(ToolCallStart(self._calls, self._new_call_id(), name))
        self._calls += 1
        self._state, self._args, self._raw = _State.ARGS, ArgumentsStream(), []

    def _give_back(self, out: list[Delta]) -> None:
        """A call that could not be read: its text, verbatim, is content."""
        out.append(ContentDelta("".join(self._raw)))
        self._raw = []

    def _new_call_id(self) -> str:
        suffix = f"{self._random.getrandbits(96):024x}" if self._random else secrets.token_hex(12)
        return f"call_{suffix}"

    # -- how each format reads a call's head

    def _on_separator(self, out: list[Delta]) -> None:
        """The separator ended the head's first part (`self._head`)."""
        raise NotImplementedError

    def _head_text_after_sep(self, text: str, out: list[Delta]) -> None:
        """`text` arrived in the head after the separator (already appended to `self._head`)."""
        raise NotImplementedError

    def _close_head(self, out: list[Delta], name_complete: bool) -> None:
        """The head ends without having announced a call: at a marker (`name_complete`) or at the end."""
        raise NotImplementedError


class DeepSeekV3ToolParser(DeepSeekToolParser):
    """`<｜tool▁call▁begin｜>TYPE<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>`; TYPE is ignored.

    TYPE is always "function", the only type OpenAI's API has.
    """

    name = "deepseek_v3"

    def _on_separator(self, out: list[Delta]) -> None:
        self._head = ""  # the type; OpenAI knows only "function"

    def _head_text_after_sep(self, text: str, out: list[Delta]) -> None:
        if "\n" not in text:
            return  # only a newline after the name ends it: skip the scan of the whole head
        head = self._head.lstrip()
        newline = head.find("\n")
        if newline <= 0:
            return
        self._announce(head[:newline].strip(), out)
        out.append(ToolCallArgs(self._calls - 1, self._args.push(head[newline + 1:])))

    def _close_head(self, out: list[Delta], name_complete: bool) -> None:
        name = self._head.strip() if self._sep_seen else ""
        if name_complete and name:
            # "function<｜tool▁sep｜>NAME<｜tool▁call▁end｜>": a call without arguments.
            self._announce(name, out)
            out.append(ToolCallArgs(self._calls - 1, self._args.finish()))
        else:
            self._give_back(out)


class DeepSeekV31ToolParser(DeepSeekToolParser):
    """`<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>`: no type, no fence."""

    name = "deepseek_v31"

    def _on_separator(self, out: list[Delta]) -> None:
        name = self._head.strip()
        if name:
            self._announce(name, out)
        # Without a name the call cannot be announced: it stays in the head and is given back.

    def _head_text_after_sep(self, text: str, out: list[Delta]) -> None:
        pass  # a nameless call's text: kept in the verbatim copy only

    def _close_head(self, out: list[Delta], name_complete: bool) -> None:
        self._give_back(out)
