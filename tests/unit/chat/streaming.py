"""Feeding a parser in every possible way and checking that the deltas add up to the complete parse."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from typing import Any

from moemesh.chat.deltas import (
    Accumulated,
    ContentDelta,
    Delta,
    ReasoningDelta,
    ToolCallArgs,
    ToolCallStart,
    accumulate,
)


def run_stream(parser: Any, chunks: Sequence[Sequence[int]]) -> list[Delta]:
    """Feed `chunks` in order, then finish; checks the protocol's rules on the way."""
    deltas: list[Delta] = []
    for chunk in chunks:
        deltas.extend(parser.feed(chunk))
    deltas.extend(parser.finish())
    check_protocol(deltas)
    return deltas


def check_protocol(deltas: Sequence[Delta]) -> None:
    """No empty delta, no broken character, each call started once, in index order, before its arguments."""
    started: list[int] = []
    for delta in deltas:
        if isinstance(delta, (ContentDelta, ReasoningDelta)):
            assert delta.text and "\ufffd" not in delta.text, delta
        elif isinstance(delta, ToolCallStart):
            assert delta.index == len(started) and delta.name and delta.type == "function", delta
            assert delta.id.startswith("call_") and len(delta.id) > len("call_"), delta
            started.append(delta.index)
        else:
            assert isinstance(delta, ToolCallArgs) and delta.arguments and delta.index in started, delta


def chunkings(ids: Sequence[int], seed: int = 0) -> list[list[list[int]]]:
    """Every two-way split, one token at a time, the whole at once, and a few random chunkings."""
    ids = list(ids)
    out = [[ids[:k], ids[k:]] for k in range(len(ids) + 1)]
    out.append([[t] for t in ids])
    rng = random.Random(seed)
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(ids)), min(len(ids) - 1, rng.randint(2, 8)))) if len(ids) > 2 else []
        bounds = [0, *cuts, len(ids)]
        out.append([ids[a:b] for a, b in itertools.pairwise(bounds)])
    return out


def assert_every_chunking_agrees(make: Callable[[], Any], ids: Sequence[int], complete: Accumulated) -> None:
    """Each chunking of `ids`, fed to a new parser from `make`, accumulates to `complete`."""
    for chunks in chunkings(ids):
        got = accumulate(run_stream(make(), chunks))
        assert got == complete, [len(c) for c in chunks]
