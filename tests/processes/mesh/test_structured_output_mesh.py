"""Structured output and logit_bias on the real mesh (`moemesh up`, prefill and decode workers: the first token
is sampled on the prefill worker under the grammar or bias, the rest on the decode worker, its grammar following
that token), with the real random tiny model, through the `openai` client and the SDK: every output matches its
schema or regex; specs that are malformed or do not compile are a 400 naming the field."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import jsonschema
import openai
import pytest

from moemesh.model.tiny_tokenizer import EOS_TOKEN
from moemesh.sdk import MeshClient
from tests.processes.mesh.launch import RunningMesh, openai_client, running_mesh

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,10}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fox"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def mesh() -> Iterator[RunningMesh]:
    with running_mesh("--prefill", "1", "--decode", "1", "--http-port", "0") as running:
        yield running


@pytest.fixture()
def client(mesh: RunningMesh) -> Iterator[openai.OpenAI]:
    with openai_client(mesh) as c:
        yield c


def test_json_schema_outputs_validate_20_of_20(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    for i in range(20):
        sampling = {"temperature": 0} if i == 0 else {"temperature": 1.0, "seed": i}
        out = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Invent person number {i}."}], max_tokens=120,
            response_format=FORMAT, **sampling)
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_streamed_and_completions_and_sdk(client: openai.OpenAI, mesh: RunningMesh) -> None:
    model = client.models.list().data[0].id
    chunks = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Stream one."}],
                                            max_tokens=120, temperature=0, response_format=FORMAT, stream=True)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), PERSON)

    pattern = r"(yes|no): [0-9]{1,2}"
    done = client.completions.create(model=model, prompt="Answer:", max_tokens=20, temperature=1.0, seed=3, n=4,
                                     extra_body={"structured_outputs": {"regex": pattern}})
    for choice in done.choices:
        assert re.fullmatch(pattern, choice.text), choice.text

    with MeshClient(mesh.gateway, timeout_s=120) as sdk:
        got = sdk.chat([{"role": "user", "content": "Once more."}], max_tokens=120, temperature=0,
                       json_schema=PERSON)
        jsonschema.validate(json.loads(got.text), PERSON)


@pytest.mark.parametrize(("extra", "says"), [
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}},
     "could not be compiled"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "could not be compiled"),
    ({"structured_outputs": {"regex": "a", "grammar": "root ::= \"a\""}}, "exactly one of"),
])
def test_bad_specs_are_400s(client: openai.OpenAI, extra: dict, says: str) -> None:
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError, match=re.escape(says)):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                       extra_body=extra)


def test_logit_bias_reaches_both_workers(client: openai.OpenAI, mesh: RunningMesh) -> None:
    """PD: the prefill worker samples the first token, the decode worker the rest; a +100 bias picks every one."""
    model = client.models.list().data[0].id
    with MeshClient(mesh.gateway, timeout_s=120) as sdk:
        target = sdk.tokenize("fox")[-1]
        free = sdk.generate("Once upon a time", max_tokens=5, temperature=0, ignore_eos=True)
        assert free.token_ids != [target] * 5
        biased = sdk.generate("Once upon a time", max_tokens=5, temperature=0, ignore_eos=True,
                              logit_bias={target: 100.0})
        assert biased.token_ids == [target] * 5
    out = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, temperature=0,
                                    logit_bias={str(target): 100}, extra_body={"ignore_eos": True})
    assert out.choices[0].text == biased.text


def test_skip_special_tokens_false_keeps_eos_in_the_text(client: openai.OpenAI) -> None:
    """A +100 bias on EOS (id 1 in the tiny model, as in DeepSeek-V3) ends the choice at once; its text is
    empty unless special tokens are kept."""
    model = client.models.list().data[0].id
    for skip, text in ((True, ""), (False, EOS_TOKEN)):
        out = client.completions.create(model=model, prompt="Once", max_tokens=4, temperature=0,
                                        logit_bias={"1": 100}, extra_body={"skip_special_tokens": skip})
        assert (out.choices[0].text, out.choices[0].finish_reason) == (text, "stop")


def test_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI, mesh: RunningMesh) -> None:
    """PD: the prefill worker computes the prompt's logprobs; they reach the client with the echo, streamed and
    not, equal to an in-process engine's (the same embedded tiny model) and to the SDK's prompt_logprobs."""
    import torch

    from moemesh.engine.engine import Engine, EngineConfig
    from moemesh.model.mla import NoCacheAttention

    model = client.models.list().data[0].id
    prompt = "The quick brown fox jumps over the lazy dog"
    with MeshClient(mesh.gateway, timeout_s=120) as sdk:
        ids = sdk.tokenize(prompt)
        via_sdk = sdk.generate(prompt, max_tokens=2, temperature=0, prompt_logprobs=2)
    engine = Engine(EngineConfig(kv_cache_mb=16))
    with torch.inference_mode():
        hidden = engine.model(torch.tensor(ids), torch.arange(len(ids)), NoCacheAttention([len(ids)]))
        ref = torch.log_softmax(engine.model.compute_logits(hidden[:-1]), dim=-1)
    want = [float(ref[p - 1, ids[p]]) for p in range(1, len(ids))]
    assert [lp for lp, _ in via_sdk.prompt_logprobs] == pytest.approx(want, abs=1e-4)

    out = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=2)
    lps = out.choices[0].logprobs
    assert out.choices[0].text.startswith(prompt)
    assert len(lps.tokens) == len(ids) + 2 and lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
    assert lps.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
    assert all(len(top) <= 2 for top in lps.top_logprobs[1:])

    streamed = [c for c in client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0,
                                                     echo=True, logprobs=2, stream=True) if c.choices]
    tokens = [lp for c in streamed if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert tokens[0] is None and tokens[1:] == pytest.approx(lps.token_logprobs[1:], abs=1e-6)


def test_max_tokens_0_with_echo_scores_the_prompt_only(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    prompt = "The quick brown fox jumps over the lazy dog"
    full = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1)
    for stream in (False, True):
        if stream:
            chunks = [c for c in client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True,
                                                           logprobs=1, stream=True) if c.choices]
            text = "".join(c.choices[0].text for c in chunks)
            lps = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
            finish = chunks[-1].choices[0].finish_reason
        else:
            out = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
            choice = out.choices[0]
            text, lps, finish = choice.text, choice.logprobs.token_logprobs, choice.finish_reason
            assert out.usage.completion_tokens == 0
        assert (text, finish) == (prompt, "length")
        assert lps == full.choices[0].logprobs.token_logprobs[:-1]  # the prompt's, without the generated token's
    with pytest.raises(openai.BadRequestError, match="needs echo"):
        client.completions.create(model=model, prompt=prompt, max_tokens=0)
