"""Incremental decoding of one run of token ids through a `decode(ids) -> str` callable.

The parsers cut the output at marker tokens; the ids between two markers are one run, decoded on its own
so that no marker text leaks into it. Within a run, decoding each token alone would break a character
whose UTF-8 bytes span two byte-level tokens, and decoding the whole run on every token would cost
quadratic time; so, as `moemesh.model.detokenizer` does, the delta is decode(ids[prefix:]) minus
decode(ids[prefix:read]), held back while it ends in U+FFFD (an incomplete character).
"""

from __future__ import annotations

from collections.abc import Sequence

from moemesh.chat.tokens import Decode

_REPLACEMENT_CHAR = "\ufffd"


class TextStream:
    """The text of one run of ids, emitted as the ids arrive; `flush` ends the run."""

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # decoding starts here, a token before the unread ones, for context
        self._read = 0  # text of ids[:read] has been emitted
        self._prefix_text = ""

    def add(self, ids: Sequence[int]) -> str:
        """Append `ids`; returns the text they make printable (often "")."""
        self._ids.extend(ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end of the run), as decoded."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        full = self._decode(self._ids[self._prefix:])
        if len(full) <= len(self._prefix_text) or (not final and full.endswith(_REPLACEMENT_CHAR)):
            return ""
        delta = full[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix:self._read])
        return delta
