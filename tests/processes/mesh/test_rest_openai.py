"""The REST facade of the real mesh (`moemesh up`, PD 1x1), driven by the official `openai` client.

One mesh for the module: starting it costs seconds of CPU. Greedy outputs must equal the gRPC SDK's.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from moemesh.sdk import MeshClient
from tests.processes.mesh.launch import RunningMesh, start_mesh

PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "Tell me about foxes."}]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def mesh() -> Iterator[RunningMesh]:
    running = start_mesh("--prefill", "1", "--decode", "1", "--http-port", "0")
    try:
        yield running
    finally:
        running.stop()
    assert running.proc.returncode == 0


@pytest.fixture(scope="module")
def client(mesh: RunningMesh) -> Iterator[openai.OpenAI]:
    http = httpx.Client(trust_env=False)  # loopback: no proxy from the environment
    try:
        yield openai.OpenAI(base_url=f"http://{mesh.services['gateway-http'][0]}/v1", api_key="unused",
                            http_client=http, max_retries=0, timeout=120)
    finally:
        http.close()


@pytest.fixture(scope="module")
def sdk(mesh: RunningMesh) -> Iterator[MeshClient]:
    with MeshClient(mesh.gateway, timeout_s=120) as client:
        yield client


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    (card,) = client.models.list().data
    assert card.object == "model"
    return card.id


def test_completions_equal_the_grpc_sdk(client: openai.OpenAI, sdk: MeshClient, model: str) -> None:
    expected = sdk.generate(prompt=PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, **GREEDY)
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == model
    (choice,) = out.choices
    assert choice.text == expected.text and choice.finish_reason == "length" and choice.index == 0
    assert out.usage.prompt_tokens == len(sdk.tokenize(PROMPT)) == expected.usage.prompt_tokens
    assert out.usage.completion_tokens == 8 and out.usage.total_tokens == out.usage.prompt_tokens + 8
    # Streamed: the same text in pieces, then the usage chunk.
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_streamed_and_not_equal_the_grpc_sdk(client: openai.OpenAI, sdk: MeshClient, model: str) -> None:
    expected = sdk.chat(CHAT, max_tokens=6, temperature=0, ignore_eos=True)
    out = client.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=6, **GREEDY)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    (choice,) = out.choices
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    # The chat template's tokens count as prompt tokens.
    assert out.usage.prompt_tokens == len(sdk.tokenize(messages=CHAT)) > len(sdk.tokenize(CHAT[0]["content"]))
    assert out.usage.completion_tokens == 6
    stream = client.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=6, stream=True,
                                            **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_logprobs_and_stop(client: openai.OpenAI, model: str) -> None:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, logprobs=2, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(x <= 0 for x in lp.token_logprobs) and all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # Greedy: the chosen token is the most likely one.
    for top, chosen in zip(lp.top_logprobs, lp.token_logprobs, strict=True):
        assert max(top.values()) == pytest.approx(chosen, abs=1e-4)
    chat = client.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=3, logprobs=True,
                                          top_logprobs=2, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    # A stop string taken from the greedy text ends the choice before it.
    text = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, **GREEDY).choices[0].text
    stop = text.strip()[len(text.strip()) // 2:][:3]
    assert stop, text
    stopped = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, stop=[stop], **GREEDY)
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop" and text.startswith(choice.text) and stop not in choice.text


def test_n_with_seed_is_reproducible(client: openai.OpenAI, model: str) -> None:
    def texts(seed: int) -> list[str]:
        out = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, n=2, seed=seed, temperature=1.0,
                                        extra_body={"ignore_eos": True})
        assert [c.index for c in out.choices] == [0, 1] and out.usage.completion_tokens == 16
        return [c.text for c in out.choices]

    first = texts(1234)
    assert texts(1234) == first  # same seed, same choices
    assert first[0] != first[1]  # seed + i per choice: the choices differ
    assert texts(99) != first


def test_errors_reach_the_client_as_openai_errors(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=1)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=-1)
    assert info.value.body["param"] == "max_tokens"
