"""Tool calls and reasoning through the real gateway, REST and the `openai` client, over loopback.

The decode worker is `ScriptedDecode`: it streams the token ids of a DeepSeek-V3-format answer (a random
tiny model never calls a tool by itself); everything from the gateway's core to the HTTP client is real.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI, BadRequestError

from moemesh.chat import tokens as chat
from moemesh.v1 import common_pb2
from tests.service.gateway.chat_doubles import ScriptedDecode, make_chat_tokenizer_dir, v3_call, v3_calls
from tests.service.gateway.doubles import Mesh
from tests.service.gateway.rest_doubles import error_of, rest_mesh, sse_events

pytestmark = pytest.mark.timeout(60)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CONTEXT = 2048  # the tools section of the prompt alone is ~400 tiny tokens
ANSWER = "Let me look." + v3_calls(v3_call("get_weather", {"city": "Paris"}), v3_call("get_time", {}))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_tokenizer_dir(tmp_path_factory.mktemp("tools") / "chat")


async def add_worker(mesh: Mesh, decode: ScriptedDecode) -> None:
    """The scripted worker, with room for long prompts (the tools make them so)."""
    await mesh.add(decode, "d1", max_model_len=CONTEXT,
                   load=common_pb2.WorkerLoad(num_free_pages=10_000, num_total_pages=10_000))


def _prompt_text(decode: ScriptedDecode, i: int = -1) -> str:
    return decode.tokenizer.decode(list(decode.requests[i].prompt_token_ids), skip_special_tokens=False)


def _joined(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream's deltas added up as an OpenAI client adds them, checking each tool-call piece's shape."""
    out: dict[str, Any] = {"content": "", "reasoning_content": "", "tool_calls": {}, "finish_reason": None}
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            out["content"] += delta.get("content") or ""
            out["reasoning_content"] += delta.get("reasoning_content") or ""
            for piece in delta.get("tool_calls", []):
                if "id" in piece:  # a call's first piece: its id, type and name, no arguments yet
                    assert set(piece) == {"index", "id", "type", "function"} and piece["type"] == "function"
                    assert piece["function"] == {"name": piece["function"]["name"], "arguments": ""}
                    out["tool_calls"][piece["index"]] = {"id": piece["id"], "name": piece["function"]["name"],
                                                         "arguments": ""}
                else:  # then fragments of its arguments
                    assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
                    out["tool_calls"][piece["index"]]["arguments"] += piece["function"]["arguments"]
            out["finish_reason"] = choice["finish_reason"] or out["finish_reason"]
    return out


@pytest.mark.parametrize("chunk", [1, 4])
def test_tool_calls_in_a_chat_completion_and_its_stream(model_dir: Path, chunk: int) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir, max_model_len=CONTEXT) as (mesh, client):
            decode = ScriptedDecode(mesh.app.model.tokenizer, ANSWER, chunk=chunk)
            await add_worker(mesh, decode)
            body = {"messages": ASK, "tools": [WEATHER, TIME], "max_tokens": 200}
            r = await client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "tool_calls"
            message = choice["message"]
            assert message["content"] == "Let me look." and message["reasoning_content"] is None
            calls = message["tool_calls"]
            assert [(c["type"], c["function"]["name"]) for c in calls] == [("function", "get_weather"),
                                                                          ("function", "get_time")]
            assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
            assert json.loads(calls[1]["function"]["arguments"]) == {}
            assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]
            # The tools reached the model: the shipped DeepSeek-V3 tool template rendered them.
            prompt = _prompt_text(decode)
            assert "### get_weather" in prompt and '"required": ["city"]' in prompt and chat.TOOL_SEP in prompt

            r = await client.post("/v1/chat/completions", json={**body, "stream": True})
            assert r.status_code == 200, r.text
            events = sse_events(r.text)
            assert events[-1] == "[DONE]"
            joined = _joined(events[:-1])
            assert joined["content"] == "Let me look." and joined["finish_reason"] == "tool_calls"
            assert [c["name"] for c in joined["tool_calls"].values()] == ["get_weather", "get_time"]
            assert json.loads(joined["tool_calls"][0]["arguments"]) == {"city": "Paris"}
            assert not any(m in json.dumps(events[:-1]) for m in (chat.TOOL_CALLS_BEGIN, chat.TOOL_SEP))

    asyncio.run(main())


def test_tool_choice_modes_and_bad_tools(model_dir: Path) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir, max_model_len=CONTEXT) as (mesh, client):
            decode = ScriptedDecode(mesh.app.model.tokenizer, ANSWER)
            await add_worker(mesh, decode)
            url = "/v1/chat/completions"
            named = {"type": "function", "function": {"name": "get_weather"}}
            for choice in ("auto", "required", named):  # required and named: parsed like auto (no constraint yet)
                r = await client.post(url, json={"messages": ASK, "tools": [WEATHER, TIME], "tool_choice": choice})
                assert r.status_code == 200, r.text
                assert len(r.json()["choices"][0]["message"]["tool_calls"]) == 2, choice
            # none: the tools are still shown, but nothing is parsed: the text comes back as the worker wrote it
            r = await client.post(url, json={"messages": ASK, "tools": [WEATHER], "tool_choice": "none"})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["message"]["tool_calls"] == [] and choice["finish_reason"] == "stop"
            assert choice["message"]["content"].startswith("Let me look.")
            assert "### get_weather" in _prompt_text(decode)

            bad = [({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                    "'nope', which is not among the tools (get_weather)"),
                   ({"tool_choice": "required"}, "tool_choice required needs tools"),
                   ({"tools": [{"type": "retrieval"}]}, "tools.0"),
                   ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "not a valid function name"),
                   ({"tools": [WEATHER, WEATHER]}, "given twice"),
                   ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
                   ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "parameters")]
            for extra, says in bad:
                err = error_of(await client.post(url, json={"messages": ASK, **extra}), 400)
                assert says in err["message"] or says == err["param"], (extra, err)
            assert len(decode.requests) == 4  # none of the bad ones reached a worker

    asyncio.run(main())


def test_openai_client_tool_round_trip(model_dir: Path) -> None:
    """Call, tool result, answer: the earlier call and its result reach the template in DeepSeek's format."""

    async def main() -> None:
        async with rest_mesh(model_dir, max_model_len=CONTEXT) as (mesh, _):
            decode = ScriptedDecode(mesh.app.model.tokenizer, "Let me look." + v3_calls(
                v3_call("get_weather", {"city": "Paris"})))
            await add_worker(mesh, decode)
            async with httpx.AsyncClient(trust_env=False) as http:
                client = AsyncOpenAI(base_url=f"http://{mesh.app.http_address}/v1", api_key="unused",
                                     http_client=http)
                model = (await client.models.list()).data[0].id
                done = await client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER],
                                                            tool_choice="auto", max_tokens=100)
                message = done.choices[0].message
                assert done.choices[0].finish_reason == "tool_calls"
                call = message.tool_calls[0]
                assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

                stream = await client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER],
                                                              tool_choice="auto", max_tokens=100, stream=True)
                names, args, finish = [], "", None
                async for chunk in stream:
                    for piece in chunk.choices[0].delta.tool_calls or []:
                        if piece.function.name:
                            names.append(piece.function.name)
                        args += piece.function.arguments or ""
                    finish = chunk.choices[0].finish_reason or finish
                assert names == ["get_weather"] and json.loads(args) == {"city": "Paris"} and finish == "tool_calls"

                decode.ids = decode.tokenizer.encode("It is 18 C in Paris.") + [1]
                history = [*ASK, message.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id, "content": "18 C"}]
                done = await client.chat.completions.create(model=model, messages=history, tools=[WEATHER],
                                                            max_tokens=100)
                assert done.choices[0].message.content == "It is 18 C in Paris."
                assert done.choices[0].finish_reason == "stop" and not done.choices[0].message.tool_calls
                prompt = _prompt_text(decode)
                rendered_call = (f"<｜Assistant｜>Let me look.{chat.TOOL_CALLS_BEGIN}{chat.TOOL_CALL_BEGIN}function"
                                 f"{chat.TOOL_SEP}get_weather\n```json\n{call.function.arguments}\n```"
                                 f"{chat.TOOL_CALL_END}{chat.TOOL_CALLS_END}<｜end▁of▁sentence｜>")
                outputs = f"{chat.TOOL_OUTPUTS_BEGIN}{chat.TOOL_OUTPUT_BEGIN}18 C{chat.TOOL_OUTPUT_END}"
                assert prompt.endswith(rendered_call + outputs + chat.TOOL_OUTPUTS_END), prompt[-300:]

                with pytest.raises(BadRequestError, match="not among the tools"):
                    await client.chat.completions.create(
                        model=model, messages=ASK, tools=[WEATHER],
                        tool_choice={"type": "function", "function": {"name": "get_time"}})

    asyncio.run(main())


def test_reasoning_content_split_in_both_modes(model_dir: Path) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir, max_model_len=CONTEXT, reasoning_parser="deepseek_r1") as (mesh, client):
            # R1's template opens <think> in the prompt: the output has only the closing tag.
            decode = ScriptedDecode(mesh.app.model.tokenizer, f"Paris is in France.{chat.THINK_CLOSE}\n\nIt is Paris.")
            await add_worker(mesh, decode)
            r = await client.post("/v1/chat/completions", json={"messages": ASK})
            message = r.json()["choices"][0]["message"]
            assert (message["reasoning_content"], message["content"]) == ("Paris is in France.", "\n\nIt is Paris.")
            r = await client.post("/v1/chat/completions", json={"messages": ASK, "stream": True})
            events = sse_events(r.text)[:-1]
            joined = _joined(events)
            assert (joined["reasoning_content"], joined["content"]) == ("Paris is in France.", "\n\nIt is Paris.")
            assert joined["finish_reason"] == "stop"
            # completions are not chat: nothing is parsed
            r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 50})
            assert chat.THINK_CLOSE in r.json()["choices"][0]["text"]

    asyncio.run(main())


def test_stop_string_is_cut_from_parsed_content(model_dir: Path) -> None:
    async def main() -> None:
        async with rest_mesh(model_dir, max_model_len=CONTEXT, reasoning_parser="deepseek_r1") as (mesh, client):
            decode = ScriptedDecode(mesh.app.model.tokenizer, f"hmm{chat.THINK_CLOSE}The answer is 42. END more",
                                    chunk=2)
            await add_worker(mesh, decode)
            for stream in (False, True):
                for keep in (False, True):
                    r = await client.post("/v1/chat/completions", json={
                        "messages": ASK, "stop": ["END"], "include_stop_str_in_output": keep, "stream": stream})
                    if stream:
                        joined = _joined(sse_events(r.text)[:-1])
                    else:
                        joined = {**r.json()["choices"][0]["message"],
                                  "finish_reason": r.json()["choices"][0]["finish_reason"]}
                    assert joined["content"] == ("The answer is 42. END" if keep else "The answer is 42. ")
                    assert joined["reasoning_content"] == "hmm" and joined["finish_reason"] == "stop"

    asyncio.run(main())
