"""Streaming detokenization: turn generated token ids into text deltas one token at a time.

Decoding each token on its own is wrong in two ways: a byte-level token may hold half of a UTF-8
character, and a sentencepiece/metaspace decoder strips the leading space of whatever it sees first.
So, as vLLM does, we keep two offsets into the ids: text up to `read_offset` has been emitted, and
decoding starts at `prefix_offset`, a few tokens earlier, so that the new token is decoded in context.
The delta is decode(ids[prefix:]) minus decode(ids[prefix:read]); it is held back while it ends in
U+FFFD, the mark of an incomplete byte sequence. A few prompt tokens seed the context, so the first
generated token keeps the space that separates it from the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from moemesh.model.tokenizer import Tokenizer

# How many prompt tokens give the first output token its context (vLLM uses 5 as well).
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """The text of one request's output, grown one token at a time.

    When every token has been added, `text` (after `flush`) equals `tokenizer.decode(output_ids)`
    for byte-level and plain BPE tokenizers; with a metaspace tokenizer and a prompt it also keeps
    the first token's leading space, which decode() alone would strip.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        context = list(prompt_ids)[-PROMPT_CONTEXT_TOKENS:]
        self._num_context = len(context)
        self._ids = context  # context tokens, then output tokens
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(0, len(context))
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        return "".join(self._parts)

    @property
    def output_ids(self) -> list[int]:
        return self._ids[self._num_context :]

    def add(self, token_id: int) -> str:
        """Append one generated token; returns the text it makes printable (often "")."""
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Text still held back (an incomplete character at the end of generation), emitted as is."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        full = self._decode(self._prefix_offset, len(self._ids))
        if len(full) <= len(self._prefix_text) or (not final and full.endswith(_REPLACEMENT_CHAR)):
            return ""
        delta = full[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        self._parts.append(delta)
        return delta

    def _decode(self, start: int, end: int) -> str:
        if start == end:
            return ""
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special)
