"""Random token sequences, markers anywhere: no parser raises, and every chunking gives the complete parse."""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from typing import Any

import pytest

from moemesh.chat.deltas import accumulate
from moemesh.chat.output import ChatOutputParser
from moemesh.chat.reasoning import DeepSeekR1ReasoningParser
from moemesh.chat.tokens import CHAT_TOKENS, decoder
from moemesh.chat.tool_parsers import DeepSeekV3ToolParser, DeepSeekV31ToolParser
from moemesh.model.tokenizer import Tokenizer
from tests.unit.chat.streaming import assert_every_chunking_agrees, run_stream

# Pieces of text near the formats' edges: newlines, fences, JSON, partial tags, multi-byte characters.
PIECES = ["\n", "```", "json", "`", "{", "}", '"a"', ": ", "1", " ", "get_weather", "function", "<", "/",
          "think", ">", "</th", "ink>", "é", "—", "x"]


def _sequences(tok: Tokenizer, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    vocab = [tok.encode(p, add_special_tokens=False) for p in PIECES]
    vocab += [tok.encode(t, add_special_tokens=False) for t in CHAT_TOKENS if tok.token_to_id(t) is not None]
    return [[i for _ in range(rng.randint(0, 25)) for i in rng.choice(vocab)] for _ in range(count)]


def _makers(tok: Tokenizer) -> dict[str, Callable[[], Any]]:
    return {
        "v3": lambda: DeepSeekV3ToolParser.from_tokenizer(tok, seed=0),
        "v31": lambda: DeepSeekV31ToolParser.from_tokenizer(tok, seed=0),
        "r1": lambda: DeepSeekR1ReasoningParser.from_tokenizer(tok),
        "r1-from-content": lambda: DeepSeekR1ReasoningParser.from_tokenizer(tok, start_in_reasoning=False),
        "r1+v3": lambda: ChatOutputParser(decoder(tok), reasoning=DeepSeekR1ReasoningParser.from_tokenizer(tok),
                                          tools=DeepSeekV3ToolParser.from_tokenizer(tok, seed=0)),
    }


@pytest.mark.parametrize("kind", ["v3", "v31", "r1", "r1-from-content", "r1+v3"])
def test_random_outputs_with_single_token_markers(chat_tok: Tokenizer, kind: str) -> None:
    make = _makers(chat_tok)[kind]
    for ids in _sequences(chat_tok, 60, seed=zlib.crc32(kind.encode())):
        complete = accumulate(run_stream(make(), [ids]))
        assert_every_chunking_agrees(make, ids, complete)


@pytest.mark.parametrize("kind", ["r1", "r1-from-content"])
def test_random_outputs_with_text_tags(byte_plain_tok: Tokenizer, kind: str) -> None:
    # One token per byte, tags as text: partial tags end many chunks.
    make = _makers(byte_plain_tok)[kind]
    for ids in _sequences(byte_plain_tok, 30, seed=3):
        complete = accumulate(run_stream(make(), [ids]))
        assert_every_chunking_agrees(make, ids, complete)
        assert (complete.reasoning_content or "") + (complete.content or "") in (
            byte_plain_tok.decode(ids).replace("</think>", "", 1).replace("<think>", "", 1),
            byte_plain_tok.decode(ids).replace("</think>", "", 1),
            byte_plain_tok.decode(ids).replace("<think>", "", 1),
            byte_plain_tok.decode(ids))


def _mutants(tok: Tokenizer, text: str, count: int, seed: int) -> list[list[int]]:
    """`text`'s ids with one to three random edits: a token dropped, repeated, or a marker put anywhere."""
    rng = random.Random(seed)
    base = tok.encode(text, add_special_tokens=False)
    markers = [tok.token_to_id(t) for t in CHAT_TOKENS]
    out = []
    for _ in range(count):
        ids = list(base)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(ids) + 1)
            edit = rng.choice(["drop", "repeat", "marker", "cut"])
            if edit == "drop" and at < len(ids):
                del ids[at]
            elif edit == "repeat" and at < len(ids):
                ids.insert(at, ids[at])
            elif edit == "marker":
                ids.insert(at, rng.choice(markers))
            else:
                ids = ids[:at]
        out.append(ids)
    return out


VALID = {
    "v3": ("Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
           '{"city": "Paris"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n'
           "{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
    "v31": ('Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}'
            "<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
    "r1": "<think>\nThe user wants the time.\n</think>\n\nIt is noon.",
    "r1-from-content": "<think>\nThe user wants the time.\n</think>\n\nIt is noon.",
    "r1+v3": ("<think>\nNeed the weather.\n</think>\n\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"
              '<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'),
}


@pytest.mark.parametrize("kind", list(VALID))
def test_mutated_valid_outputs(chat_tok: Tokenizer, kind: str) -> None:
    make = _makers(chat_tok)[kind]
    for ids in _mutants(chat_tok, VALID[kind], 40, seed=zlib.crc32(kind.encode())):
        complete = accumulate(run_stream(make(), [ids]))
        assert_every_chunking_agrees(make, ids, complete)
