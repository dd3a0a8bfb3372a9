"""Which chat parsers a tokenizer's model needs, from its vocabulary and its chat template.

Tool calls: the five markers must be single tokens (else None). The template then tells the format
apart: V3.1's writes `tool['function']['name'] + '<｜tool▁sep｜>'` (the name before the separator) and
no fence, V3's writes `tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n```json\\n'`.
A vocabulary with the markers but a template that shows neither gets V3's format, the original one
(V3, V3-0324, R1 and R1-0528 all use it).

Reasoning: a template that writes `<think>` or `</think>` belongs to a thinking model (R1, R1-0528,
V3.1); V3 and V3-0324's templates mention neither.
"""

from __future__ import annotations

import re

from moemesh.chat.tokens import THINK_MARKERS, TOOL_CALL_MARKERS, TOOL_SEP, TokenizerLike, single_token_ids

_QUOTE = "['\"]"
_FUNCTION_NAME = (rf"tool\s*(?:\[\s*{_QUOTE}function{_QUOTE}\s*\]|\.function)"
                  rf"\s*(?:\[\s*{_QUOTE}name{_QUOTE}\s*\]|\.name)")
# The name, then the separator: V3.1 (V3 puts the type there and the name after the separator).
_NAME_THEN_SEP = re.compile(rf"{_FUNCTION_NAME}\s*\+\s*{_QUOTE}{re.escape(TOOL_SEP)}")
_FENCE = "```json"


def detect_tool_parser(tokenizer: TokenizerLike) -> str | None:
    """The registered tool-call parser for `tokenizer` (`deepseek_v3`, `deepseek_v31`), or None."""
    if single_token_ids(tokenizer, TOOL_CALL_MARKERS) is None:
        return None
    template = getattr(tokenizer, "chat_template", None) or ""
    if _NAME_THEN_SEP.search(template):
        return "deepseek_v31"
    if TOOL_SEP in template and _FENCE not in template:
        return "deepseek_v31"  # the separator without V3's fenced arguments
    return "deepseek_v3"


def detect_reasoning_parser(tokenizer: TokenizerLike) -> str | None:
    """The registered reasoning parser for `tokenizer` (`deepseek_r1`), or None for a model that does not think."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return "deepseek_r1" if any(tag in template for tag in THINK_MARKERS) else None
