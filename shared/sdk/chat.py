"""Chat requests in OpenAI's shapes (messages with tool calls, tools, tool_choice) as the wire's ChatMessages.

    chat_messages(
        [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}],
        tool_choice="auto")

Only the shapes are checked here (what the wire cannot carry); the gateway validates the rest.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from moemesh.sdk.errors import InvalidArgumentError
from moemesh.v1 import gateway_pb2

ToolChoice = str | Mapping[str, Any] | None
_MODES = {"auto": gateway_pb2.TOOL_CHOICE_AUTO, "none": gateway_pb2.TOOL_CHOICE_NONE,
          "required": gateway_pb2.TOOL_CHOICE_REQUIRED}


def _bad(message: str) -> InvalidArgumentError:
    return InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, message)


def chat_messages(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, *,
                  tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: ToolChoice = None,
                  chat_template_kwargs: Mapping[str, Any] | None = None,
                  continue_final_message: bool = False) -> gateway_pb2.ChatMessages:
    """The wire's ChatMessages of OpenAI-style `messages`, `tools` and `tool_choice`."""
    chat = gateway_pb2.ChatMessages(messages=[_message(m, i) for i, m in enumerate(messages)],
                                    add_generation_prompt=add_generation_prompt,
                                    tools=[_tool(t, i) for i, t in enumerate(tools or ())],
                                    continue_final_message=continue_final_message)
    _set_tool_choice(chat, tool_choice)
    if chat_template_kwargs:
        if not isinstance(chat_template_kwargs, Mapping):
            raise _bad("chat_template_kwargs must be a dict")
        chat.chat_template_kwargs_json = _json(chat_template_kwargs, "chat_template_kwargs")
    return chat


def _message(m: Mapping[str, Any], i: int) -> gateway_pb2.ChatMessage:
    content = m.get("content") if isinstance(m, Mapping) else None
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not (
            isinstance(content, str) or (content is None and m.get("role") == "assistant")):
        raise _bad(f"messages[{i}] must be a dict with a string 'role' and a string 'content' (None only for an "
                   "assistant turn that calls tools)")
    msg = gateway_pb2.ChatMessage(role=m["role"], content=content or "", tool_call_id=_str(m, "tool_call_id", i),
                                  name=_str(m, "name", i))
    for j, call in enumerate(m.get("tool_calls") or ()):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise _bad(f"messages[{i}].tool_calls[{j}] must be a dict with function.name")
        args = fn.get("arguments", "")
        msg.tool_calls.add(id=str(call.get("id") or ""), name=fn["name"],
                           arguments=args if isinstance(args, str) else _json(args, f"messages[{i}].tool_calls[{j}]"))
    return msg


def _str(m: Mapping[str, Any], key: str, i: int) -> str:
    value = m.get(key)
    if value is not None and not isinstance(value, str):
        raise _bad(f"messages[{i}].{key} must be a string")
    return value or ""


def _tool(tool: Mapping[str, Any], i: int) -> gateway_pb2.Tool:
    fn = tool.get("function") if isinstance(tool, Mapping) else None
    if not isinstance(fn, Mapping) or tool.get("type", "function") != "function" or not isinstance(fn.get("name"), str):
        raise _bad(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
    params = fn.get("parameters")
    return gateway_pb2.Tool(name=fn["name"], description=str(fn.get("description") or ""),
                            parameters_json=_json(params, f"tools[{i}].function.parameters") if params else "")


def _set_tool_choice(chat: gateway_pb2.ChatMessages, choice: ToolChoice) -> None:
    if choice is None:
        return
    if isinstance(choice, str):
        if choice not in _MODES:
            raise _bad(f"tool_choice must be auto, none, required or a function, got {choice!r}")
        chat.tool_choice = _MODES[choice]
        return
    fn = choice.get("function") if isinstance(choice, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise _bad("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}")
    chat.tool_choice = gateway_pb2.TOOL_CHOICE_FUNCTION
    chat.tool_choice_function = fn["name"]


def _json(value: Any, where: str) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise _bad(f"{where} cannot be sent as JSON: {exc}") from None
