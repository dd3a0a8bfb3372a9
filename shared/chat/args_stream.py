"""A tool call's arguments, streamed as generated, with the fence and the whitespace around them removed.

DeepSeek-V3 writes arguments as a fenced block ("```json\\n{...}\\n```"); V3.1 writes the bare JSON. Both
are read the same way, leniently: leading whitespace, an opening "```" or "```json" line, and at the end
whitespace, a closing "```" and whitespace again are not part of the arguments. While streaming, a run of
whitespace and backticks at the end is held back (it may be the closing fence, known only when the call's
end marker arrives), so every fragment sent is a prefix of the final string and their concatenation equals
it exactly. Empty arguments become "{}": OpenAI clients json.loads() them.
"""

from __future__ import annotations

_FENCE = "```"
_LANGUAGE = "json"
_HOLD = " \t\r\n`"  # characters that may belong to the closing fence
EMPTY_ARGUMENTS = "{}"


class ArgumentsStream:
    """The text after a call's name, pushed as it is decoded; yields the arguments' fragments."""

    def __init__(self) -> None:
        # Only what has not gone out is kept (short: the held-back end), so long arguments cost linear time.
        self._unsent = ""
        self._started = False  # the opening fence is behind us
        self._sent_any = False

    def push(self, text: str) -> str:
        """Add decoded text; returns the next fragment ("" while undecided or held back)."""
        self._unsent += text
        if not self._started:
            start = _arguments_start(self._unsent, final=False)
            if start is None:
                return ""
            self._started, self._unsent = True, self._unsent[start:]
        cut = len(self._unsent.rstrip(_HOLD))
        return self._send(cut)

    def finish(self) -> str:
        """The call ended: the rest of the arguments, without the closing fence ("{}" when there were none)."""
        if not self._started:
            self._started = True
            self._unsent = self._unsent[_arguments_start(self._unsent, final=True):]
        fragment = self._send(_arguments_end(self._unsent))
        self._unsent = ""
        return fragment if (self._sent_any or fragment) else EMPTY_ARGUMENTS

    def _send(self, cut: int) -> str:
        fragment, self._unsent = self._unsent[:cut], self._unsent[cut:]
        self._sent_any = self._sent_any or bool(fragment)
        return fragment


def _arguments_start(body: str, final: bool) -> int | None:
    """Index where the arguments start in `body`; None while the opening fence is still undecided."""
    i = _skip_space(body, 0)
    rest = body[i:]
    if not rest:
        return len(body) if final else None
    if not rest.startswith(_FENCE):
        # A partial fence ("`", "``") waits for more text; anything else is the arguments themselves.
        return None if (_FENCE.startswith(rest) and not final) else i
    j = i + len(_FENCE)
    after = body[j:]
    if after.startswith(_LANGUAGE):
        j += len(_LANGUAGE)
    elif _LANGUAGE.startswith(after) and not final:
        return None
    k = _skip_space(body, j)
    return None if (k == len(body) and not final) else k


def _skip_space(text: str, i: int) -> int:
    return len(text) - len(text[i:].lstrip())


def _arguments_end(text: str) -> int:
    """Index where the arguments in `text` end: before trailing whitespace, a closing fence, and whitespace.

    Only characters of the held-back kind are cut, so everything sent before stays a prefix of the result.
    """
    end = len(text.rstrip())
    if text[:end].endswith(_FENCE):
        end = len(text[:end - len(_FENCE)].rstrip())
    return end
