"""The chat parsers on the real mesh (`moemesh up --reasoning-parser deepseek_r1`, colocated) with the real tiny
model: its greedy output, read by the parser, reaches REST and the SDK as reasoning (R1's rule: a prompt that
says nothing of <think> starts in the think block) and equals the unparsed completion of the same prompt."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from moemesh.sdk import MeshClient
from tests.processes.mesh.launch import RunningMesh, start_mesh

CHAT = [{"role": "user", "content": "Tell me about foxes."}]


@pytest.fixture(scope="module")
def mesh() -> Iterator[RunningMesh]:
    running = start_mesh("--prefill", "0", "--decode", "1", "--http-port", "0", "--reasoning-parser", "deepseek_r1")
    try:
        yield running
    finally:
        running.stop()


def test_real_outputs_go_to_reasoning_content(mesh: RunningMesh) -> None:
    with MeshClient(mesh.gateway, timeout_s=120) as sdk, httpx.Client(trust_env=False) as http:
        prompt = sdk.tokenize(messages=CHAT)
        raw = sdk.generate(token_ids=prompt, max_tokens=8, temperature=0, ignore_eos=True)  # not chat: not parsed
        assert raw.text
        done = sdk.chat(CHAT, max_tokens=8, temperature=0, ignore_eos=True)
        assert (done.reasoning_text, done.text, done.token_ids) == (raw.text, "", raw.token_ids)

        client = openai.OpenAI(base_url=f"http://{mesh.services['gateway-http'][0]}/v1", api_key="unused",
                               http_client=http, max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        out = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True})
        message = out.choices[0].message
        assert (message.reasoning_content, message.content) == (raw.text, "")
        streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in
                           client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0,
                                                          stream=True, extra_body={"ignore_eos": True}))
        assert streamed == raw.text
