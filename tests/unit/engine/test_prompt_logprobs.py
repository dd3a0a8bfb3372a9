"""Prompt logprobs: each prompt token's logprob given the tokens before it, as one uncached forward over the whole
prompt computes it, whatever the chunking, with a cached prefix present (it is not reused), and from the prefill
side of PD (with the first token it hands over)."""

from __future__ import annotations

import pytest
import torch

from moemesh.engine.engine import Engine, EngineConfig
from moemesh.engine.sampling_params import InvalidParameter, SamplingParams
from moemesh.model.mla import NoCacheAttention

PROMPT = list(range(10, 60))


@pytest.fixture(scope="module")
def engine() -> Engine:
    # 16 tokens a step: the 50-token prompt prefills in four chunks.
    return Engine(EngineConfig(kv_cache_mb=64, max_num_batched_tokens=16))


def _reference(engine: Engine, prompt: list[int]) -> torch.Tensor:
    """[len - 1, V] float32: log-softmax of positions 0..len-2, one forward without a cache."""
    with torch.inference_mode():
        ids = torch.tensor(prompt)
        hidden = engine.model(ids, torch.arange(len(prompt)), NoCacheAttention([len(prompt)]))
        return torch.log_softmax(engine.model.compute_logits(hidden[:-1]), dim=-1)


def _first_output(engine: Engine, params: SamplingParams, prefill_only: bool = False):
    rid = engine.add_request(PROMPT, params, prefill_only=prefill_only)
    while True:
        for out in engine.step():
            if out.request_id == rid:
                return out


def test_prompt_logprobs_match_one_uncached_forward(engine: Engine) -> None:
    engine.generate([PROMPT], SamplingParams(max_tokens=1))  # now its prefix is cached
    out = _first_output(engine, SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=3))
    assert out.num_cached_tokens == 0  # the cached prefix was not reused: its logits are needed
    ref = _reference(engine, PROMPT)
    got = out.prompt_logprobs
    assert len(got) == len(PROMPT) and got[0] is None
    for p in range(1, len(PROMPT)):
        logprob, top = got[p]
        assert logprob == pytest.approx(float(ref[p - 1, PROMPT[p]]), abs=1e-5)
        want_ids = ref[p - 1].topk(3).indices.tolist()
        assert [t for t, _ in top] == want_ids
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)


def test_the_prefill_side_of_pd_reports_them(engine: Engine) -> None:
    out = _first_output(engine, SamplingParams(max_tokens=3, prompt_logprobs=0), prefill_only=True)
    assert out.prefill_done and len(out.prompt_logprobs) == len(PROMPT)
    assert all(top == [] for _, top in out.prompt_logprobs[1:])
    engine.release(out.request_id)


def test_only_the_first_output_carries_them_and_range_is_checked(engine: Engine) -> None:
    rid = engine.add_request(PROMPT, SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=1,
                                                    ignore_eos=True))
    outs = []
    while not outs or not outs[-1].finished:
        outs += [o for o in engine.step() if o.request_id == rid]
    assert outs[0].prompt_logprobs is not None and all(o.prompt_logprobs is None for o in outs[1:])
    with pytest.raises(InvalidParameter, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
