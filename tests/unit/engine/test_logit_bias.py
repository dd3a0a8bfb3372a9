"""logit_bias: added to the raw logits before sampling (after logprobs are taken, as OpenAI reports them), so a
large bias picks a token and -100 bans it; ids outside the vocabulary are refused when the request is added."""

from __future__ import annotations

import pytest
import torch

from moemesh.engine.engine import Engine, EngineConfig
from moemesh.engine.sampling import Sampler, SamplingRow
from moemesh.engine.sampling_params import InvalidParameter, SamplingParams


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(kv_cache_mb=64))


def test_bias_steers_greedy_and_seeded_sampling(engine: Engine) -> None:
    free = engine.generate(["hello world"], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    forced = engine.generate(["hello world"], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                                                             logit_bias={77: 100.0}))[0]
    assert free.token_ids != [77] * 6 and forced.token_ids == [77] * 6
    banned = {t: -100.0 for t in set(free.token_ids)}
    avoided = engine.generate(["hello world"], SamplingParams(max_tokens=6, temperature=1.0, seed=5, ignore_eos=True,
                                                              logit_bias=banned))[0]
    assert not set(avoided.token_ids) & set(banned)


def test_logprobs_stay_those_of_the_raw_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    row = SamplingRow(SamplingParams(temperature=0.0, logprobs=0, logit_bias={2: 50.0}), None, [], [])
    out = Sampler()(logits, [row])
    assert out.token_ids == [2]
    assert out.logprobs[0] == pytest.approx(float(torch.log_softmax(logits, -1)[0, 2]))


@pytest.mark.parametrize(("bias", "says"), [({5: 101.0}, r"\[-100, 100\]"), ({-1: 1.0}, "non-negative"),
                                            ({5: float("nan")}, r"\[-100, 100\]")])
def test_bad_bias_is_refused(bias: dict, says: str) -> None:
    with pytest.raises(InvalidParameter, match=says):
        SamplingParams(logit_bias=bias)


def test_ids_outside_the_vocabulary_are_refused(engine: Engine) -> None:
    vocab = engine.model.config.vocab_size
    with pytest.raises(InvalidParameter, match="outside the vocabulary"):
        engine.add_request("x", SamplingParams(logit_bias={vocab: 1.0}))


def test_special_tokens_stay_in_the_text_when_asked(engine: Engine) -> None:
    eos = engine.eos_token_ids[0]
    params = {"max_tokens": 3, "temperature": 0.0, "logit_bias": {eos: 100.0}}  # EOS first: the request stops
    kept = engine.generate(["hello"], SamplingParams(skip_special_tokens=False, **params))[0]
    dropped = engine.generate(["hello"], SamplingParams(**params))[0]
    assert kept.token_ids == dropped.token_ids == [eos] and kept.finish_reason == "stop"
    assert (kept.text, dropped.text) == (engine.tokenizer.decode([eos], skip_special_tokens=False), "")
    assert kept.text
