"""DeepSeek-R1 reasoning parsing: keyed on the think tokens' ids, or on text with split tags held back."""

from __future__ import annotations

import pytest

from moemesh.chat.deltas import Accumulated, ContentDelta, ReasoningDelta
from moemesh.chat.reasoning import Channel, DeepSeekR1ReasoningParser
from moemesh.chat.tokens import THINK_CLOSE, THINK_OPEN
from moemesh.model.tiny_tokenizer import ASSISTANT_TOKEN, BOS_TOKEN, EOS_TOKEN, USER_TOKEN
from moemesh.model.tokenizer import Tokenizer
from tests.unit.chat.streaming import assert_every_chunking_agrees, run_stream

R1_THINKING = ("Okay, the user is asking what 17 times 24 is. Let me break it down: 17 × 20 = 340, and "
               "17 × 4 = 68. Adding them gives 408. Let me double-check: 24 × 17 = 24 × 10 + 24 × 7 = 240 + 168 "
               "= 408. Yes.\n")
R1_ANSWER = "\n\n**17 × 24 = 408**\n\nBreaking it down: 17 × 20 = 340 and 17 × 4 = 68, so 340 + 68 = 408."

# (output, start_in_reasoning, reasoning_content, content)
CASES = [
    # R1's template opens "<think>\n" in the prompt: the output has only the closing tag.
    pytest.param(f"{R1_THINKING}{THINK_CLOSE}{R1_ANSWER}{EOS_TOKEN}", None, R1_THINKING, R1_ANSWER,
                 id="r1-only-closing-tag"),
    # R1-0528 writes both tags; the opening one is not reasoning text.
    pytest.param(f"{THINK_OPEN}\n{R1_THINKING}{THINK_CLOSE}{R1_ANSWER}{EOS_TOKEN}", None, "\n" + R1_THINKING,
                 R1_ANSWER, id="r1-0528-both-tags"),
    pytest.param(f"{THINK_OPEN}\n{R1_THINKING}{THINK_CLOSE}{R1_ANSWER}", False, "\n" + R1_THINKING, R1_ANSWER,
                 id="opening-tag-opens-from-content"),
    # max_tokens inside the thinking: everything is reasoning.
    pytest.param(f"{THINK_OPEN}\nOkay, let me think about the Riemann hypothesis", None,
                 "\nOkay, let me think about the Riemann hypothesis", None, id="cut-inside-thinking"),
    pytest.param(f"Hello! How can I help you today?{EOS_TOKEN}", False, None, "Hello! How can I help you today?",
                 id="v31-non-thinking"),
    pytest.param(f"{THINK_CLOSE}The answer is 4.", None, None, "The answer is 4.", id="empty-thinking"),
    pytest.param(f"a{THINK_OPEN}b{THINK_CLOSE}c{THINK_CLOSE}d", None, f"a{THINK_OPEN}b", f"c{THINK_CLOSE}d",
                 id="later-tags-are-text"),
    pytest.param("Reasoning about </thi", None, "Reasoning about </thi", None, id="partial-tag-at-the-end"),
    pytest.param("<thi", False, None, "<thi", id="partial-opening-tag-at-the-end"),
    pytest.param("<thinking>is not a tag</thinking> right", False, None, "<thinking>is not a tag</thinking> right",
                 id="lookalike-tags"),
    pytest.param(f"{THINK_CLOSE}{THINK_OPEN}", True, None, THINK_OPEN, id="tags-only"),
]


def _check(tok: Tokenizer, output: str, start: bool | None, reasoning: str | None, content: str | None) -> None:
    ids = tok.encode(output, add_special_tokens=False)
    make = lambda: DeepSeekR1ReasoningParser.from_tokenizer(tok, start_in_reasoning=start)  # noqa: E731
    result = make().parse_complete(ids)
    assert result == (reasoning, content)
    assert_every_chunking_agrees(make, ids, Accumulated(result.reasoning_content, result.content))


@pytest.mark.parametrize(("output", "start", "reasoning", "content"), CASES)
def test_keyed_on_token_ids(chat_tok: Tokenizer, output: str, start: bool | None, reasoning: str | None,
                            content: str | None) -> None:
    assert DeepSeekR1ReasoningParser.from_tokenizer(chat_tok).keyed_on_ids
    _check(chat_tok, output, start, reasoning, content)


@pytest.mark.parametrize(("output", "start", "reasoning", "content"), CASES)
def test_keyed_on_text(plain_tok: Tokenizer, output: str, start: bool | None, reasoning: str | None,
                       content: str | None) -> None:
    # The default tiny tokenizer writes "</think>" as several tokens: every split of it is a case here.
    assert not DeepSeekR1ReasoningParser.from_tokenizer(plain_tok).keyed_on_ids
    assert len(plain_tok.encode(THINK_CLOSE, add_special_tokens=False)) > 1
    _check(plain_tok, output, start, reasoning, content)


@pytest.mark.parametrize("with_tags", [True, False])
def test_multibyte_text_one_byte_per_token(byte_tok: Tokenizer, byte_plain_tok: Tokenizer, with_tags: bool) -> None:
    tok = byte_tok if with_tags else byte_plain_tok
    thinking, answer = "用户问的是天气。我应该先想一想 🤔\n", "\n\n今天北京晴，气温 25°C ☀️。"
    _check(tok, f"{THINK_OPEN}{thinking}{THINK_CLOSE}{answer}{EOS_TOKEN}", None, thinking, answer)


def test_a_tag_split_across_deltas_is_held_back(plain_tok: Tokenizer) -> None:
    parser = DeepSeekR1ReasoningParser.from_tokenizer(plain_tok)
    assert parser.feed(plain_tok.encode("So it is 4.</th", add_special_tokens=False)) == [ReasoningDelta("So it is 4.")]
    assert parser.feed(plain_tok.encode("ink>The answer", add_special_tokens=False)) == [ContentDelta("The answer")]
    assert parser.finish() == []
    parser = DeepSeekR1ReasoningParser.from_tokenizer(plain_tok)
    assert parser.feed(plain_tok.encode("x </", add_special_tokens=False)) == [ReasoningDelta("x ")]
    assert parser.feed(plain_tok.encode("b> y", add_special_tokens=False)) == [ReasoningDelta("</b> y")]


PROMPTS = [
    # (the prompt's end, where the output starts)
    pytest.param(f"{USER_TOKEN}Hi{ASSISTANT_TOKEN}{THINK_OPEN}\n", True, id="r1-template-opens"),
    pytest.param(f"{USER_TOKEN}Hi{ASSISTANT_TOKEN}{THINK_CLOSE}x{EOS_TOKEN}{USER_TOKEN}Hi{ASSISTANT_TOKEN}"
                 f"{THINK_OPEN}", True, id="v31-thinking-after-history"),
    pytest.param(f"{USER_TOKEN}Hi{ASSISTANT_TOKEN}{THINK_CLOSE}", False, id="v31-non-thinking"),
    pytest.param(f"{USER_TOKEN}Hi{ASSISTANT_TOKEN}", True, id="no-tag-r1-default"),
]


@pytest.mark.parametrize(("prompt", "starts_in_reasoning"), PROMPTS)
@pytest.mark.parametrize("tok_name", ["chat_tok", "plain_tok"])
def test_the_prompt_says_where_the_output_starts(request: pytest.FixtureRequest, tok_name: str, prompt: str,
                                                  starts_in_reasoning: bool) -> None:
    tok: Tokenizer = request.getfixturevalue(tok_name)
    prompt_ids = tok.encode(BOS_TOKEN + prompt)
    parser = DeepSeekR1ReasoningParser.from_tokenizer(tok, prompt_ids=prompt_ids)
    assert parser.in_reasoning is starts_in_reasoning
    ids = tok.encode("Hello there.", add_special_tokens=False)
    expected = (("Hello there.", None) if starts_in_reasoning else (None, "Hello there."))
    assert parser.parse_complete(ids) == expected
    forced = DeepSeekR1ReasoningParser.from_tokenizer(tok, prompt_ids=prompt_ids, start_in_reasoning=False)
    assert forced.parse_complete(ids) == (None, "Hello there.")


def test_split_routes_ids(chat_tok: Tokenizer, plain_tok: Tokenizer) -> None:
    open_id, close_id = chat_tok.token_to_id(THINK_OPEN), chat_tok.token_to_id(THINK_CLOSE)
    parser = DeepSeekR1ReasoningParser.from_tokenizer(chat_tok)
    assert parser.split([open_id, 10, 11]) == [(Channel.REASONING, [10, 11])]
    assert parser.split([12, close_id]) == [(Channel.REASONING, [12]), (Channel.CONTENT, [])]
    assert parser.split([open_id, close_id, 13]) == [(Channel.CONTENT, [open_id, close_id, 13])]
    with pytest.raises(RuntimeError, match="single tokens"):
        DeepSeekR1ReasoningParser.from_tokenizer(plain_tok).split([1])


def test_deltas_and_finish(chat_tok: Tokenizer) -> None:
    parser = DeepSeekR1ReasoningParser.from_tokenizer(chat_tok)
    deltas = run_stream(parser, [chat_tok.encode(f"{THINK_OPEN}Hmm.{THINK_CLOSE}Yes.", add_special_tokens=False)])
    assert deltas == [ReasoningDelta("Hmm."), ContentDelta("Yes.")]
    assert [d.to_openai() for d in deltas] == [{"reasoning_content": "Hmm."}, {"content": "Yes."}]
    assert parser.finish() == []
