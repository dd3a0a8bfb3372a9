"""`tool_choice` required or a named function: the output constrained to tool calls in the model's own format.

As vLLM and SGLang do, a forced choice becomes structured output: a structural tag (xgrammar's JSON format)
that admits only the model's tool-call block, its markers as their single special tokens (the parsers read
token ids, so a marker spelled out in ordinary tokens would not be a call), each call's name one of the
allowed functions and its arguments valid against that function's parameter schema:

    deepseek_v3:   CALLS (CALL "function" SEP NAME "\\n```json\\n" ARGS "\\n```" END) ("\\n" CALL ... END)* CALLS_END
    deepseek_v31:  CALLS (CALL NAME SEP ARGS END)+ CALLS_END

required admits one or more calls of any tool (exactly one with parallel_tool_calls false); a named function
exactly one call of it. The model's stop token
then ends the output.
"""

from __future__ import annotations

import json
from typing import Any

from moemesh.chat.tokens import TOOL_CALL_MARKERS, TokenizerLike, single_token_ids
from moemesh.service.errors import InvalidArgument
from moemesh.v1 import common_pb2, gateway_pb2

FORCED = (gateway_pb2.TOOL_CHOICE_REQUIRED, gateway_pb2.TOOL_CHOICE_FUNCTION)


def forced_tool_calls(chat: gateway_pb2.ChatMessages, tool_parser: str, tokenizer: TokenizerLike
                      ) -> common_pb2.StructuredOutput:
    """The constraint of a chat request whose tool_choice is required or a named function."""
    ids = single_token_ids(tokenizer, TOOL_CALL_MARKERS)
    if ids is None:  # the parser could not have been chosen either; kept for a clear message all the same
        raise InvalidArgument("tool_choice required or named needs DeepSeek's tool-call tokens in the vocabulary")
    calls_begin, call_begin, sep, call_end, calls_end = (ids[m] for m in TOOL_CALL_MARKERS)
    tools = [t for t in chat.tools if chat.tool_choice != gateway_pb2.TOOL_CHOICE_FUNCTION
             or t.name == chat.tool_choice_function]
    v3 = tool_parser == "deepseek_v3"

    def call(tool: gateway_pb2.Tool) -> dict[str, Any]:
        schema = json.loads(tool.parameters_json) if tool.parameters_json else {"type": "object"}
        # Whitespace bounded: a model (a random one surely) could otherwise pad the arguments up to max_tokens.
        args = {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1}
        if v3:
            parts = [_token(call_begin), _text("function"), _token(sep), _text(f"{tool.name}\n```json\n"), args,
                     _text("\n```"), _token(call_end)]
        else:
            parts = [_token(call_begin), _text(tool.name), _token(sep), args, _token(call_end)]
        return {"type": "sequence", "elements": parts}

    one = {"type": "or", "elements": [call(t) for t in tools]} if len(tools) > 1 else call(tools[0])
    single = chat.HasField("parallel_tool_calls") and not chat.parallel_tool_calls
    if chat.tool_choice == gateway_pb2.TOOL_CHOICE_FUNCTION or single:
        calls = one
    else:
        more = {"type": "sequence", "elements": [_text("\n"), one]} if v3 else one
        calls = {"type": "sequence", "elements": [one, {"type": "star", "content": more}]}
    tag = {"type": "structural_tag",
           "format": {"type": "sequence", "elements": [_token(calls_begin), calls, _token(calls_end)]}}
    return common_pb2.StructuredOutput(structural_tag=json.dumps(tag))


def _token(token_id: int) -> dict[str, Any]:
    return {"type": "token", "token": token_id}


def _text(value: str) -> dict[str, Any]:
    return {"type": "const_string", "value": value}
