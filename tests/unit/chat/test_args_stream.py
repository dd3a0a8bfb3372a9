"""The arguments of one call, pushed in pieces: fences and surrounding whitespace removed, fragments exact."""

from __future__ import annotations

import pytest

from moemesh.chat.args_stream import ArgumentsStream

CASES = [
    ('```json\n{"a": 1}\n```', '{"a": 1}'),  # DeepSeek-V3
    ('{"a": 1}', '{"a": 1}'),  # DeepSeek-V3.1
    ('\n```json\n\n  {"a": 1}\n```\n', '{"a": 1}'),
    ('```\n[1, 2]\n```', "[1, 2]"),
    ('```json {"a": 1}```', '{"a": 1}'),
    ('  {"cmd": "echo `date`"}  ', '{"cmd": "echo `date`"}'),
    ('```json\n{"a": "``"}```', '{"a": "``"}'),
    ('{"code": "```py\\nprint(1)\\n```"}\n```', '{"code": "```py\\nprint(1)\\n```"}'),
    ('{"a": 1}\n``', '{"a": 1}\n``'),  # not a fence: kept
    ("", "{}"),
    ("```json\n", "{}"),
    ("  \n ", "{}"),
    ("`", "`"),
    ('{"truncated": "ye', '{"truncated": "ye'),
]


@pytest.mark.parametrize(("body", "arguments"), CASES)
def test_every_split_gives_the_arguments(body: str, arguments: str) -> None:
    splits = [[body[:k], body[k:]] for k in range(len(body) + 1)] + [list(body)]
    for pieces in splits:
        stream = ArgumentsStream()
        fragments = [stream.push(piece) for piece in pieces]
        sent = "".join(fragments)
        assert arguments.startswith(sent) or arguments == "{}"  # nothing sent is ever taken back
        fragments.append(stream.finish())
        assert "".join(fragments) == arguments, pieces


def test_arguments_go_out_before_the_end() -> None:
    stream = ArgumentsStream()
    assert stream.push("```js") == ""  # "```json" or not: undecided
    assert stream.push("on\n{\"city\": ") == '{"city":'  # a trailing space is held back too
    assert stream.push('"Paris"}\n``') == ' "Paris"}'  # the newline and backticks may be the closing fence
    assert stream.push("`") == ""
    assert stream.finish() == ""
