"""The shipped tool-aware DeepSeek-V3 chat template: what it renders, and that the parser reads what it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moemesh.chat import detect_reasoning_parser, detect_tool_parser, make_tool_parser
from moemesh.chat import tokens as t
from moemesh.chat.templates import SHIPPED, TemplateNotFound, load_template, renders_tools, shipped
from moemesh.model.tiny_tokenizer import CHAT_TEMPLATE
from moemesh.model.tokenizer import Tokenizer

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


@pytest.fixture(scope="module")
def v3(chat_tok: Tokenizer) -> Tokenizer:
    return chat_tok.with_chat_template(shipped("deepseek_v3_tools"), "deepseek_v3_tools")


def _call_text(name: str, args: str) -> str:
    return f"{t.TOOL_CALL_BEGIN}function{t.TOOL_SEP}{name}\n```json\n{args}\n```{t.TOOL_CALL_END}"


def test_a_conversation_without_tools_renders_as_deepseek_v3(v3: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}]
    assert v3.apply_chat_template(messages) == (
        f"{BOS}Be brief.\n\nBe kind.{USER}Hi{ASSISTANT}Hello!{EOS}{USER}Bye{ASSISTANT}")
    assert v3.apply_chat_template(messages, add_generation_prompt=False).endswith(f"{USER}Bye")


def test_tools_calls_and_outputs_render_in_deepseeks_format(v3: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL, {**CALL, "id": "call_2", "function": {
                    "name": "get_weather", "arguments": {"city": "Rome"}}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
                {"role": "tool", "tool_call_id": "call_2", "content": "24 C"}]
    text = v3.apply_chat_template(messages, tools=[WEATHER])
    system, _, conversation = text.partition(USER)
    assert system.startswith(f"{BOS}Be brief.\n\n## Tools\n")
    assert "\n### get_weather\nDescription: The weather now.\nParameters: " + json.dumps(
        WEATHER["function"]["parameters"]) + "\n" in system
    assert conversation == (
        "Weather in Paris and Rome?" + ASSISTANT + t.TOOL_CALLS_BEGIN + _call_text("get_weather", '{"city": "Paris"}')
        + "\n" + _call_text("get_weather", '{"city": "Rome"}') + t.TOOL_CALLS_END + EOS
        + t.TOOL_OUTPUTS_BEGIN + t.TOOL_OUTPUT_BEGIN + "18 C" + t.TOOL_OUTPUT_END + "\n" + t.TOOL_OUTPUT_BEGIN
        + "24 C" + t.TOOL_OUTPUT_END + t.TOOL_OUTPUTS_END)  # the model answers right after the outputs
    # The answer after the outputs has no assistant tag of its own, as in DeepSeek's template.
    answered = v3.apply_chat_template([*messages, {"role": "assistant", "content": "Mild."}], tools=[WEATHER])
    assert answered.endswith(t.TOOL_OUTPUTS_END + "Mild." + EOS + ASSISTANT)


def test_the_parser_reads_the_calls_the_template_writes(v3: Tokenizer) -> None:
    """What the template teaches (and writes in the history) is what the deepseek_v3 parser reads."""
    text = v3.apply_chat_template([{"role": "user", "content": "?"}, {"role": "assistant", "content": "Sure.",
                                   "tool_calls": [CALL]}], add_generation_prompt=False)
    answer = text[text.index(ASSISTANT) + len(ASSISTANT):text.rindex(EOS)]
    parsed = make_tool_parser("deepseek_v3", v3, seed=0).parse_complete(v3.encode(answer, add_special_tokens=False))
    assert parsed.content == "Sure."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("get_weather", {"city": "Paris"})]


def test_detection_on_the_shipped_template(v3: Tokenizer) -> None:
    assert detect_tool_parser(v3) == "deepseek_v3"
    assert detect_reasoning_parser(v3) is None  # V3 does not think


def test_renders_tools_and_loading(tmp_path: Path) -> None:
    assert renders_tools(shipped("deepseek_v3_tools")) and not renders_tools(CHAT_TEMPLATE)
    assert not renders_tools(None)
    assert load_template("deepseek_v3_tools") == shipped("deepseek_v3_tools") and set(SHIPPED) == {"deepseek_v3_tools"}
    own = tmp_path / "t.jinja"
    own.write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    assert load_template(str(own)) == "{{ messages[0]['content'] }}"
    with pytest.raises(TemplateNotFound, match="neither a file"):
        load_template(str(tmp_path / "missing.jinja"))


def test_unknown_roles_are_refused(v3: Tokenizer) -> None:
    from moemesh.model.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="unknown role critic"):
        v3.apply_chat_template([{"role": "critic", "content": "?"}])
