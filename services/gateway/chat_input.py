"""Chat messages to prompt token ids: the request's turns, tools and template options checked and rendered.

One `ChatRenderer` per gateway, shared by Generate and Tokenize (REST and gRPC), so a conversation always
renders the same way. Which template renders a request:

- `--chat-template FILE` (or a shipped template's name) replaces the model's for every request;
- a request with tools whose template ignores `tools` (DeepSeek-V3's official one) renders with the
  shipped tool-aware template of the tool-call parser's format (`moemesh.chat.templates`), if there is one;
  otherwise it is refused: tools that never reach the model would fail silently.

Every check raises InvalidArgument naming the field, so REST answers 400 and gRPC INVALID_ARGUMENT.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from moemesh.chat.templates import TOOLS_TEMPLATE_FOR_PARSER, renders_tools, shipped
from moemesh.model.tokenizer import Tokenizer, TokenizerError
from moemesh.service.errors import InvalidArgument
from moemesh.v1 import gateway_pb2

log = logging.getLogger(__name__)

# Chat roles are short words (system, user, assistant, tool); templates echo unknown ones in errors.
MAX_ROLE_CHARS = 64
# OpenAI's rule for function names.
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# Template variables a request may not replace through chat_template_kwargs.
_RESERVED_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"})
_NO_PARAMETERS = {"type": "object", "properties": {}}


def tools_requested(chat: gateway_pb2.ChatMessages) -> bool:
    """Whether the model's tool calls are to be parsed: tools given and tool_choice not none."""
    return len(chat.tools) > 0 and chat.tool_choice != gateway_pb2.TOOL_CHOICE_NONE


@dataclass(frozen=True)
class ChatRenderer:
    """Renders ChatMessages with `tokenizer`'s template; `tools_tokenizer` (the same vocabulary with a
    tool-aware template) takes requests with tools when the first template ignores them."""

    tokenizer: Tokenizer
    tools_tokenizer: Tokenizer | None = None
    tool_parser: str | None = None

    @classmethod
    def build(cls, tokenizer: Tokenizer, tool_parser: str | None) -> ChatRenderer:
        """The renderer of a model (its template already replaced by --chat-template, if given) whose
        tool calls `tool_parser` reads (None: tool calls are not served)."""
        tools_tokenizer = None
        shipped_name = TOOLS_TEMPLATE_FOR_PARSER.get(tool_parser or "")
        if tool_parser and not renders_tools(tokenizer.chat_template) and shipped_name:
            tools_tokenizer = tokenizer.with_chat_template(shipped(shipped_name), f"moemesh's {shipped_name}")
            log.info("requests with tools render with moemesh's %s chat template (the model's ignores tools)",
                     shipped_name)
        return cls(tokenizer, tools_tokenizer, tool_parser)

    def render(self, chat: gateway_pb2.ChatMessages) -> list[int]:
        """Token ids of `chat` (the template writes its own BOS); InvalidArgument for what cannot render."""
        check_chat(chat)
        tools = [_tool_for_template(t, i) for i, t in enumerate(chat.tools)]
        tokenizer = self._tokenizer_for(chat)
        kwargs = _template_kwargs(chat.chat_template_kwargs_json)
        turns = [_turn(m) for m in chat.messages]
        try:
            text = tokenizer.apply_chat_template(
                turns, add_generation_prompt=chat.add_generation_prompt and not chat.continue_final_message,
                tools=tools or None, **kwargs)
        except TokenizerError as exc:
            raise InvalidArgument(str(exc)) from None
        if chat.continue_final_message:
            text = _open_final_message(text, chat.messages[-1].content)
        return tokenizer.encode(text, add_special_tokens=False)

    def _tokenizer_for(self, chat: gateway_pb2.ChatMessages) -> Tokenizer:
        if tools_requested(chat) and self.tool_parser is None:  # calls that could never be read back
            raise InvalidArgument("this gateway serves no tool calls for its model (no tool-call parser: its "
                                  "tokenizer lacks DeepSeek's tool-call tokens, or --tool-call-parser none); "
                                  "send no tools, or tool_choice none")
        if not chat.tools or renders_tools(self.tokenizer.chat_template):
            return self.tokenizer
        if self.tools_tokenizer is not None:
            return self.tools_tokenizer
        if not tools_requested(chat):
            return self.tokenizer  # tool_choice none: the tools are not needed, the model's template is kept
        raise InvalidArgument(f"the model's chat template ignores tools and moemesh ships none for the "
                              f"{self.tool_parser} format; start the gateway with --chat-template FILE (a template "
                              "that renders tools), or send tool_choice none")


def check_chat(chat: gateway_pb2.ChatMessages) -> None:
    """INVALID_ARGUMENT naming the first bad field of a conversation, its tools or its template options."""
    if not chat.messages:
        raise InvalidArgument("messages must not be empty")
    for i, m in enumerate(chat.messages):
        if len(m.role) > MAX_ROLE_CHARS:
            raise InvalidArgument(f"messages[{i}].role is {len(m.role)} characters long; at most {MAX_ROLE_CHARS} "
                                  f"are allowed (roles are words like system, user, assistant)")
        if m.tool_calls and m.role != "assistant":
            raise InvalidArgument(f"messages[{i}] has tool_calls but role {m.role!r}: only assistant turns call "
                                  "tools")
        for j, call in enumerate(m.tool_calls):
            if not call.name:
                raise InvalidArgument(f"messages[{i}].tool_calls[{j}].function.name must not be empty")
    names = [t.name for t in chat.tools]
    for i, name in enumerate(names):
        if not _FUNCTION_NAME.match(name):
            raise InvalidArgument(f"tools[{i}].function.name {name!r} is not a valid function name (1 to 64 "
                                  "letters, digits, '_', '-' or '.')")
        if name in names[:i]:
            raise InvalidArgument(f"tools[{i}].function.name {name!r} is given twice")
    choice = chat.tool_choice
    if choice in (gateway_pb2.TOOL_CHOICE_REQUIRED, gateway_pb2.TOOL_CHOICE_FUNCTION) and not names:
        raise InvalidArgument(f"tool_choice {_choice_name(chat)} needs tools")
    if choice == gateway_pb2.TOOL_CHOICE_FUNCTION and chat.tool_choice_function not in names:
        raise InvalidArgument(f"tool_choice names the function {chat.tool_choice_function!r}, which is not among "
                              f"the tools ({', '.join(names)})")
    if chat.tool_choice_function and choice != gateway_pb2.TOOL_CHOICE_FUNCTION:
        raise InvalidArgument("tool_choice_function is only for tool_choice TOOL_CHOICE_FUNCTION")
    if chat.continue_final_message and chat.add_generation_prompt:
        raise InvalidArgument("continue_final_message and add_generation_prompt cannot both be true: one continues "
                              "the last message, the other opens a new assistant turn")


def _choice_name(chat: gateway_pb2.ChatMessages) -> str:
    return gateway_pb2.ToolChoice.Name(chat.tool_choice).removeprefix("TOOL_CHOICE_").lower()


def _turn(m: gateway_pb2.ChatMessage) -> dict[str, Any]:
    """One message as chat templates read it (OpenAI's shape; keys only for what is set)."""
    turn: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        turn["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                              for c in m.tool_calls]
    if m.tool_call_id:
        turn["tool_call_id"] = m.tool_call_id
    if m.name:
        turn["name"] = m.name
    return turn


def _tool_for_template(tool: gateway_pb2.Tool, i: int) -> dict[str, Any]:
    parameters = _NO_PARAMETERS
    if tool.parameters_json:
        try:
            parameters = json.loads(tool.parameters_json)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"tools[{i}].function.parameters is not valid JSON: {exc.msg}") from None
        if not isinstance(parameters, dict):
            raise InvalidArgument(f"tools[{i}].function.parameters must be a JSON Schema object, got "
                                  f"{type(parameters).__name__}")
    return {"type": "function",
            "function": {"name": tool.name, "description": tool.description, "parameters": parameters}}


def _template_kwargs(text: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"chat_template_kwargs is not valid JSON: {exc.msg}") from None
    if not isinstance(kwargs, dict):
        raise InvalidArgument(f"chat_template_kwargs must be an object, got {type(kwargs).__name__}")
    clash = sorted(_RESERVED_VARIABLES.intersection(kwargs))
    if clash:
        raise InvalidArgument(f"chat_template_kwargs cannot set {', '.join(clash)}: the request's own fields do")
    return kwargs


def _open_final_message(text: str, content: str) -> str:
    """The rendered conversation cut right after the last message's content, so generation continues it
    (as vLLM's continue_final_message: the template's end-of-turn tokens are dropped)."""
    at = text.rfind(content) if content else -1
    if at < 0:
        raise InvalidArgument("continue_final_message: the last message's content does not appear in the rendered "
                              "prompt (the chat template changes it), so it cannot be continued")
    return text[:at + len(content)]
