"""Chat requests checked and rendered by the gateway: tools, tool_choice, history with calls, template options."""

from __future__ import annotations

import pytest

from moemesh.chat import tokens as t
from moemesh.model.tiny_tokenizer import build_tiny_tokenizer
from moemesh.model.tokenizer import Tokenizer
from moemesh.service.errors import InvalidArgument
from moemesh.services.gateway.chat_input import ChatRenderer, tools_requested
from moemesh.v1 import gateway_pb2 as pb

TOOL = pb.Tool(name="get_weather", description="Weather.", parameters_json='{"type": "object"}')


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    out = tmp_path_factory.mktemp("chat")
    build_tiny_tokenizer(out, 1024, chat_tokens=True)
    return Tokenizer.from_dir(out)


def _chat(*messages: pb.ChatMessage, **fields: object) -> pb.ChatMessages:
    return pb.ChatMessages(messages=list(messages) or [pb.ChatMessage(role="user", content="hi")],
                           add_generation_prompt=fields.pop("add_generation_prompt", True), **fields)


def _text(tok: Tokenizer, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False)


def test_requests_with_tools_render_with_the_shipped_tool_template(tok: Tokenizer) -> None:
    renderer = ChatRenderer.build(tok, "deepseek_v3")
    plain = _text(tok, renderer.render(_chat()))
    assert plain == tok.apply_chat_template([{"role": "user", "content": "hi"}])  # no tools: the model's own
    with_tools = _text(tok, renderer.render(_chat(tools=[TOOL])))
    assert "### get_weather\nDescription: Weather.\nParameters: {\"type\": \"object\"}" in with_tools
    call = pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="c1", name="get_weather", arguments="{}")])
    history = _text(tok, renderer.render(_chat(pb.ChatMessage(role="user", content="?"), call,
                                               pb.ChatMessage(role="tool", tool_call_id="c1", content="sunny"),
                                               tools=[TOOL])))
    assert history.endswith(f"{t.TOOL_CALL_END}{t.TOOL_CALLS_END}<｜end▁of▁sentence｜>{t.TOOL_OUTPUTS_BEGIN}"
                            f"{t.TOOL_OUTPUT_BEGIN}sunny{t.TOOL_OUTPUT_END}{t.TOOL_OUTPUTS_END}")


def test_tools_without_a_parser_or_a_template_are_refused(tok: Tokenizer) -> None:
    with pytest.raises(InvalidArgument, match="no tool-call parser"):
        ChatRenderer.build(tok, None).render(_chat(tools=[TOOL]))
    with pytest.raises(InvalidArgument, match="no tool-call parser"):  # even when the template renders tools
        ChatRenderer.build(tok.with_chat_template("{{ tools }}", "t"), None).render(_chat(tools=[TOOL]))
    with pytest.raises(InvalidArgument, match="moemesh ships none for the deepseek_v31 format"):
        ChatRenderer.build(tok, "deepseek_v31").render(_chat(tools=[TOOL]))
    # tool_choice none: the tools are not needed, the model's template renders the messages
    none = _chat(tools=[TOOL], tool_choice=pb.TOOL_CHOICE_NONE)
    assert ChatRenderer.build(tok, None).render(none) == ChatRenderer.build(tok, None).render(_chat())
    assert not tools_requested(none) and tools_requested(_chat(tools=[TOOL]))


@pytest.mark.parametrize(("fields", "says"), [
    ({"tools": [pb.Tool(name="a b")]}, "tools[0].function.name 'a b' is not a valid function name"),
    ({"tools": [pb.Tool(name="x" * 65)]}, "is not a valid function name"),
    ({"tools": [TOOL, TOOL]}, "tools[1].function.name 'get_weather' is given twice"),
    ({"tools": [pb.Tool(name="f", parameters_json="{")]}, "tools[0].function.parameters is not valid JSON"),
    ({"tools": [pb.Tool(name="f", parameters_json="[]")]}, "must be a JSON Schema object, got list"),
    ({"tool_choice": pb.TOOL_CHOICE_REQUIRED}, "tool_choice required needs tools"),
    ({"tools": [TOOL], "tool_choice": pb.TOOL_CHOICE_FUNCTION, "tool_choice_function": "other"},
     "names the function 'other', which is not among the tools (get_weather)"),
    ({"tools": [TOOL], "tool_choice_function": "get_weather"}, "only for tool_choice TOOL_CHOICE_FUNCTION"),
    ({"chat_template_kwargs_json": "[1]"}, "chat_template_kwargs must be an object, got list"),
    ({"chat_template_kwargs_json": "{x"}, "chat_template_kwargs is not valid JSON"),
    ({"chat_template_kwargs_json": '{"tools": 1, "bos_token": ""}'}, "cannot set bos_token, tools"),
    ({"continue_final_message": True}, "cannot both be true"),
])
def test_bad_requests_name_the_field(tok: Tokenizer, fields: dict, says: str) -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        ChatRenderer.build(tok, "deepseek_v3").render(_chat(**fields))
    assert says in str(excinfo.value)


def test_bad_messages_name_the_field(tok: Tokenizer) -> None:
    renderer = ChatRenderer.build(tok, "deepseek_v3")
    with pytest.raises(InvalidArgument, match=r"messages\[0\] has tool_calls but role 'user'"):
        renderer.render(_chat(pb.ChatMessage(role="user", content="?", tool_calls=[pb.ToolCall(name="f")])))
    with pytest.raises(InvalidArgument, match=r"messages\[0\].tool_calls\[0\].function.name must not be empty"):
        renderer.render(_chat(pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(arguments="{}")])))
    with pytest.raises(InvalidArgument, match="knows the roles system, user and assistant, not tool"):
        renderer.render(_chat(pb.ChatMessage(role="tool", content="x")))  # the tiny template, no tools


def test_continue_final_message_and_template_kwargs(tok: Tokenizer) -> None:
    template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}[end]{% endfor %}" \
               "{% if flag %}FLAG{% endif %}"
    renderer = ChatRenderer.build(tok.with_chat_template(template, "test"), None)
    messages = [pb.ChatMessage(role="user", content="hi"), pb.ChatMessage(role="assistant", content="It is")]
    ids = renderer.render(_chat(*messages, add_generation_prompt=False, continue_final_message=True))
    assert _text(tok, ids).endswith("[assistant]It is")
    ids = renderer.render(_chat(*messages, chat_template_kwargs_json='{"flag": true}'))
    assert _text(tok, ids).endswith("[end]FLAG")
