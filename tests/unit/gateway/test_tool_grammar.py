"""Forced tool calls (tool_choice required or named) as structured output, in both DeepSeek formats: the real tiny
model (random weights, DeepSeek's chat tokens) under the constraint writes calls that the matching parser reads
back, with the allowed names and arguments valid against each tool's schema, greedy and sampled."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from moemesh.chat.registry import make_tool_parser
from moemesh.engine.engine import Engine, EngineConfig
from moemesh.engine.sampling_params import SamplingParams
from moemesh.model.tiny import make_tiny
from moemesh.service.convert import structured_from_pb
from moemesh.services.gateway.tool_grammar import forced_tool_calls
from moemesh.v1 import gateway_pb2

CITY = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}
ZONE = {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}
SCHEMAS = {"get_weather": CITY, "get_time": ZONE}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    model = make_tiny(Path(tmp_path_factory.mktemp("chat-tiny")), chat_tokens=True)
    return Engine(EngineConfig(model=str(model), kv_cache_mb=64))


def _chat(choice: int, function: str = "", parallel: bool | None = None) -> gateway_pb2.ChatMessages:
    chat = gateway_pb2.ChatMessages(
        tools=[gateway_pb2.Tool(name=n, parameters_json=json.dumps(s)) for n, s in SCHEMAS.items()],
        tool_choice=choice, tool_choice_function=function)
    if parallel is not None:
        chat.parallel_tool_calls = parallel
    return chat


def _outputs(engine: Engine, chat: gateway_pb2.ChatMessages, parser: str) -> list:
    spec = structured_from_pb(forced_tool_calls(chat, parser, engine.tokenizer))
    params = [SamplingParams(max_tokens=200, temperature=0.0 if i == 0 else 1.0, seed=i, structured_output=spec)
              for i in range(4)]
    return engine.generate(["Call a tool."] * 4, params)


@pytest.mark.parametrize("parser", ["deepseek_v3", "deepseek_v31"])
@pytest.mark.parametrize(("choice", "function"), [(gateway_pb2.TOOL_CHOICE_REQUIRED, ""),
                                                  (gateway_pb2.TOOL_CHOICE_FUNCTION, "get_weather")])
def test_one_forced_call_parses_back_valid(engine: Engine, parser: str, choice: int, function: str) -> None:
    """Named, or required without parallel calls: exactly one call, then the model's stop token."""
    for out in _outputs(engine, _chat(choice, function, parallel=False), parser):
        assert out.finish_reason == "stop", out.text
        parsed = make_tool_parser(parser, engine.tokenizer).parse_complete(out.token_ids)
        assert parsed.content is None and len(parsed.tool_calls) == 1
        call = parsed.tool_calls[0]
        assert call.name == (function or call.name) and call.name in SCHEMAS
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


@pytest.mark.parametrize("parser", ["deepseek_v3", "deepseek_v31"])
def test_required_admits_several_calls(engine: Engine, parser: str) -> None:
    """Parallel calls (the default): one or more, each valid; a random model may chain calls up to max_tokens, and
    then only the call cut short there is incomplete."""
    several = 0
    for out in _outputs(engine, _chat(gateway_pb2.TOOL_CHOICE_REQUIRED), parser):
        calls = make_tool_parser(parser, engine.tokenizer).parse_complete(out.token_ids).tool_calls
        assert calls
        several += len(calls) > 1
        for call in calls[:-1] if out.finish_reason == "length" else calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    assert several  # the constraint did admit more than one call somewhere
