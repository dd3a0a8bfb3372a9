"""Structured output in the engine: a request's grammar masks every sampled token (xgrammar), so the real tiny
model's outputs, greedy or sampled, match the JSON Schema, regex or EBNF asked for; the grammar follows tokens
taken from elsewhere (a resumed request's outputs); specs it cannot compile are refused by name."""

from __future__ import annotations

import json
import sys

import jsonschema
import pytest
import torch

from moemesh.engine.engine import Engine, EngineConfig, Resume
from moemesh.engine.grammar import GrammarEngine
from moemesh.engine.sampling import Sampler, SamplingRow
from moemesh.engine.sampling_params import InvalidParameter, SamplingParams, StructuredOutput

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,12}$"},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "colour": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "ok", "n", "colour"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(kv_cache_mb=64))


def _params(spec: StructuredOutput, n: int, max_tokens: int = 96) -> list[SamplingParams]:
    """Choice 0 greedy, the others sampled at temperature 1 with seeds: the mask, not the model, must hold them."""
    return [SamplingParams(max_tokens=max_tokens, temperature=0.0 if i == 0 else 1.0, seed=i, structured_output=spec)
            for i in range(n)]


def test_json_schema_outputs_all_validate(engine: Engine) -> None:
    spec = StructuredOutput("json_schema", json.dumps(PERSON))
    outs = engine.generate([f"Describe person {i}." for i in range(20)], _params(spec, 20))
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), PERSON)
    # Unconstrained, the same model writes no JSON at all: the mask did the work.
    free = engine.generate(["Describe person 0."], SamplingParams(max_tokens=24, temperature=0.0))[0]
    with pytest.raises(ValueError):
        json.loads(free.text)


def test_json_object_regex_and_grammar(engine: Engine) -> None:
    # Any object: a random model's strings may run past max_tokens; those that end are objects, the rest begin one.
    objects = engine.generate(["hello"] * 6, _params(StructuredOutput("json_object"), 6))
    for out in objects:
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)
        else:
            assert out.text.startswith("{")
    assert any(out.finish_reason == "stop" for out in objects)
    import re

    pattern = r"(yes|no), [0-9]{1,3}!"
    for out in engine.generate(["hello"] * 4, _params(StructuredOutput("regex", pattern), 4)):
        assert re.fullmatch(pattern, out.text), out.text
    grammar = 'root ::= "a" item ("," item)* "."\nitem ::= [0-9]'
    for out in engine.generate(["hello"] * 4, _params(StructuredOutput("grammar", grammar), 4)):
        assert re.fullmatch(r"a[0-9](,[0-9])*\.", out.text), out.text


def test_the_grammar_ends_the_request_even_past_eos(engine: Engine) -> None:
    spec = StructuredOutput("regex", "ab")
    out = engine.generate(["x"], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True,
                                                structured_output=spec))[0]
    assert (out.text, out.finish_reason) == ("ab", "stop")


def test_a_resumed_request_continues_in_its_grammar(engine: Engine) -> None:
    spec = StructuredOutput("json_schema", json.dumps(PERSON))
    params = SamplingParams(max_tokens=96, temperature=0.0, structured_output=spec)
    whole = engine.generate(["Describe person 7."], params)[0]
    rid = engine.add_request("Describe person 7.", params, resume=Resume(token_ids=whole.token_ids[:5]))
    req = engine.requests[rid]  # kept: a finished request leaves `requests`
    while not req.finished:
        engine.step()
    assert req.output_token_ids == whole.token_ids
    jsonschema.validate(json.loads(req.output_text), PERSON)


def test_resumed_outputs_that_break_the_grammar_are_refused(engine: Engine) -> None:
    spec = StructuredOutput("regex", "[0-9]+")
    letters = engine.tokenizer.encode("abc")
    with pytest.raises(InvalidParameter, match="structured_output"):
        engine.add_request("x", SamplingParams(max_tokens=8, structured_output=spec),
                           resume=Resume(token_ids=letters))


@pytest.mark.parametrize(("kind", "spec", "says"), [
    ("json_schema", '{"type": "frobnicate"}', "frobnicate"),
    ("regex", "(unclosed", "parenthesis"),
    ("grammar", "root ::= ", "EBNF"),
])
def test_specs_that_do_not_compile_are_refused_by_name(engine: Engine, kind: str, spec: str, says: str) -> None:
    with pytest.raises(InvalidParameter, match=f"structured_output {kind} could not be compiled: .*{says}"):
        engine.add_request("x", SamplingParams(structured_output=StructuredOutput(kind, spec)))


@pytest.mark.parametrize(("kind", "spec", "says"), [
    ("yaml", "a: 1", "kind must be one of"),
    ("json_schema", "{not json", "not valid JSON"),
    ("json_schema", "[1, 2]", "must be a JSON object"),
    ("regex", "   ", "must not be empty"),
])
def test_malformed_specs_fail_validation(kind: str, spec: str, says: str) -> None:
    with pytest.raises(InvalidParameter, match=says):
        StructuredOutput(kind, spec)


def test_without_xgrammar_a_constrained_request_names_the_package(engine: Engine,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # as if not installed
    fresh = GrammarEngine(engine.tokenizer, engine.model.config.vocab_size, engine.eos_token_ids)
    with pytest.raises(InvalidParameter, match=r"xgrammar.*moemesh\[structured\]"):
        fresh.compile(StructuredOutput("json_object"))


def test_sampler_takes_only_allowed_tokens(engine: Engine) -> None:
    """A row whose most likely tokens the grammar forbids samples an allowed one; a free row is untouched."""
    digits = StructuredOutput("regex", "[0-9]")
    vocab = engine.model.config.vocab_size
    allowed = {t for t in range(vocab) if engine.tokenizer.decode([t]) in set("0123456789")}
    assert allowed
    logits = torch.zeros(2, vocab)
    banned_top = next(t for t in range(vocab) if t not in allowed)
    logits[:, banned_top] = 50.0
    rows = [SamplingRow(SamplingParams(temperature=0.0), None, [], [], (), engine.grammars.state(digits)),
            SamplingRow(SamplingParams(temperature=0.0), None, [], [])]
    out = Sampler(torch.Generator().manual_seed(0))(logits, rows)
    assert out.token_ids[0] in allowed
    assert out.token_ids[1] == banned_top
