"""Tool calls on the real mesh through the `openai` client: `moemesh up` (prefill and decode workers) on a random
tiny checkpoint whose tokenizer has DeepSeek's tool-call tokens (`make-tiny --chat-tokens`; the gateway detects
the deepseek_v3 parser and renders tools with its shipped template). tool_choice required and named force calls
through structured output, so even a random model calls, with arguments valid against the tool's schema; the
call, the tool's result and the next answer make a round trip, streamed and not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from moemesh.model.tiny import make_tiny
from tests.processes.mesh.launch import RunningMesh, openai_client, running_mesh

WEATHER_ARGS = {
    "type": "object",
    "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,8}$"}, "days": {"type": "integer", "minimum": 1,
                                                                        "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME_ARGS = {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
             "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER_ARGS}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a zone",
                                      "parameters": TIME_ARGS}},
]
SCHEMAS = {"get_weather": WEATHER_ARGS, "get_time": TIME_ARGS}
ASK = [{"role": "user", "content": "What is the weather in Paris, and the time?"}]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    model = make_tiny(Path(tmp_path_factory.mktemp("chat-tiny")), chat_tokens=True)
    with running_mesh("--model", str(model), "--prefill", "1", "--decode", "1", "--http-port", "0") as running:
        yield running


@pytest.fixture()
def client(mesh: RunningMesh) -> Iterator[openai.OpenAI]:
    with openai_client(mesh) as c:
        yield c


def _check_calls(calls: list) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_forces_valid_calls_and_the_round_trip_answers(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    # One call (parallel_tool_calls false): a random model, free to chain calls, might run to max_tokens.
    out = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False, max_tokens=200, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    _check_calls(choice.message.tool_calls)
    assert len(choice.message.tool_calls) == 1

    history = [*ASK, choice.message.model_dump(exclude_none=True)]
    history += [{"role": "tool", "tool_call_id": c.id, "content": json.dumps({"ok": True, "n": i})}
                for i, c in enumerate(choice.message.tool_calls)]
    answer = client.chat.completions.create(model=model, messages=history, tools=TOOLS, tool_choice="auto",
                                            max_tokens=16, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > out.usage.prompt_tokens  # the calls and results reached the prompt


def test_named_choice_streams_one_call_of_that_function(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    named = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(3):
        calls: dict[int, dict] = {}
        finish = None
        for chunk in client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice=named,
                                                    max_tokens=200, temperature=1.0, seed=seed, stream=True):
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            for piece in delta.tool_calls or ():
                call = calls.setdefault(piece.index, {"name": "", "arguments": ""})
                if piece.function and piece.function.name:
                    call["name"] += piece.function.name
                if piece.function and piece.function.arguments:
                    call["arguments"] += piece.function.arguments
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls"
        assert [c["name"] for c in calls.values()] == ["get_weather"]
        jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER_ARGS)


def test_forced_choice_with_response_format_is_a_400(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError, match="without response_format"):
        client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                       response_format={"type": "json_object"}, max_tokens=8)
