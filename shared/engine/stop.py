"""When a request stops, and how much of its text is safe to stream before that is known."""

from __future__ import annotations

from collections.abc import Sequence

from moemesh.engine.request import FinishReason, Request


def check_stop(req: Request, token: int, eos_token_ids: Sequence[int], max_model_len: int
               ) -> tuple[FinishReason | None, int | str | None]:
    """Decide after `token` was appended (and `req.output_text` extended) whether the request ends.

    Returns (reason, stop_reason): stop_reason is the stop token id or stop string that matched.
    A matched stop string is cut from `req.output_text` (kept when `include_stop_str_in_output`).
    """
    p = req.params
    if req.num_output_tokens >= p.min_tokens:
        if token in p.stop_token_ids:
            return FinishReason.STOP, token
        if not p.ignore_eos and token in eos_token_ids:
            return FinishReason.STOP, None
        if p.stop:
            hit = find_stop_string(req.output_text, p.stop, p.include_stop_str_in_output)
            if hit is not None:
                cut, stop = hit
                req.output_text = req.output_text[:cut]
                return FinishReason.STOP, stop
    if req.num_output_tokens >= p.max_tokens or req.num_tokens >= max_model_len:
        return FinishReason.LENGTH, None
    return None, None


def find_stop_string(text: str, stops: Sequence[str], include: bool) -> tuple[int, str] | None:
    """The earliest stop string in `text`: (where the kept text ends, the string), or None."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    if best is None:
        return None
    i, s = best
    return (i + len(s) if include else i), s


def streamable_len(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be sent now: hold back a tail that could still grow into a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold
