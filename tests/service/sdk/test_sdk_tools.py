"""Tool calls, reasoning and the chat template options through the SDK and the gateway's gRPC API (loopback,
a scripted decode worker: see tests/service/gateway/chat_doubles.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from moemesh.chat import tokens as chat
from moemesh.sdk import AsyncMeshClient, InvalidArgumentError, MeshClient, ToolCall
from moemesh.v1 import common_pb2
from tests.service.gateway.chat_doubles import ScriptedDecode, make_chat_tokenizer_dir, v3_call, v3_calls
from tests.service.gateway.doubles import Mesh

pytestmark = pytest.mark.timeout(60)
CONTEXT = 2048
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_tokenizer_dir(tmp_path_factory.mktemp("sdk-tools") / "chat")


async def _mesh_with(mesh: Mesh, text: str) -> ScriptedDecode:
    decode = ScriptedDecode(mesh.app.model.tokenizer, text, chunk=2)
    await mesh.add(decode, "d1", max_model_len=CONTEXT,
                   load=common_pb2.WorkerLoad(num_free_pages=10_000, num_total_pages=10_000))
    return decode


def test_async_client_tool_calls_and_reasoning(model_dir: Path) -> None:
    answer = f"The user wants weather.{chat.THINK_CLOSE}Checking." + v3_calls(v3_call("get_weather", {"city": "Paris"}))

    async def main() -> None:
        async with Mesh(model_dir, max_model_len=CONTEXT, reasoning_parser="deepseek_r1") as mesh:
            decode = await _mesh_with(mesh, answer)
            async with AsyncMeshClient(mesh.app.address, timeout_s=20) as client:
                done = await client.chat(ASK, tools=[WEATHER], tool_choice="required", max_tokens=200)
                assert done.finish_reason == "tool_calls"
                assert (done.reasoning_text, done.text) == ("The user wants weather.", "Checking.")
                (call,) = done.tool_calls
                assert isinstance(call, ToolCall) and call.name == "get_weather" and call.id.startswith("call_")
                assert json.loads(call.arguments) == {"city": "Paris"}

                chunks = [c async for c in client.chat_stream(ASK, tools=[WEATHER], max_tokens=200)]
                pieces = [p for c in chunks for p in c.tool_calls]
                assert pieces[0].name == "get_weather" and pieces[0].id and pieces[0].arguments == ""
                assert all(p.id is None and p.name is None for p in pieces[1:])
                assert json.loads("".join(p.arguments for p in pieces)) == {"city": "Paris"}
                assert "".join(c.reasoning_text for c in chunks) == "The user wants weather."
                assert chunks[-1].finish_reason == "tool_calls"

                # tool_choice none: not parsed, the call stays in the text (reasoning still split)
                done = await client.chat(ASK, tools=[WEATHER], tool_choice="none", max_tokens=200)
                assert done.tool_calls == [] and done.finish_reason == "stop" and chat.TOOL_SEP in done.text

                # The round trip's history reaches the template; so do tools in Tokenize.
                history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
                    {"role": "tool", "tool_call_id": call.id, "content": "18 C"}]
                ids = await client.tokenize(messages=history, tools=[WEATHER])
                text = decode.tokenizer.decode(ids, skip_special_tokens=False)
                assert "### get_weather" in text and text.endswith(
                    f"{chat.TOOL_OUTPUT_BEGIN}18 C{chat.TOOL_OUTPUT_END}{chat.TOOL_OUTPUTS_END}")
                await client.chat(history, tools=[WEATHER], max_tokens=200)
                assert list(decode.requests[-1].prompt_token_ids) == ids

                with pytest.raises(InvalidArgumentError, match="not among the tools"):
                    await client.chat(ASK, tools=[WEATHER], tool_choice={"function": {"name": "get_time"}})
                with pytest.raises(InvalidArgumentError, match="chat_template_kwargs cannot set messages"):
                    await client.chat(ASK, chat_template_kwargs={"messages": []})

    asyncio.run(main())


def test_blocking_client_continue_final_message_and_template_kwargs(model_dir: Path) -> None:
    async def main() -> None:
        async with Mesh(model_dir, max_model_len=CONTEXT) as mesh:
            decode = await _mesh_with(mesh, " warm.")

            def use() -> None:
                with MeshClient(mesh.app.address, timeout_s=20) as client:
                    messages = [*ASK, {"role": "assistant", "content": "It is"}]
                    done = client.chat(messages, add_generation_prompt=False, continue_final_message=True,
                                       max_tokens=50, chat_template_kwargs={"unused_flag": True})
                    assert done.text == " warm."
                    prompt = decode.tokenizer.decode(list(decode.requests[-1].prompt_token_ids),
                                                     skip_special_tokens=False)
                    assert prompt.endswith("<｜Assistant｜>It is"), prompt
                    with pytest.raises(InvalidArgumentError, match="cannot both be true"):
                        client.chat(messages, continue_final_message=True)

            await asyncio.to_thread(use)

    asyncio.run(main())
