"""The warm-up a worker runs before it takes requests: what it runs, and that nothing of it stays visible."""

from __future__ import annotations

import logging

import pytest
import torch

from moemesh.engine.engine import Engine, EngineConfig
from moemesh.engine.sampling_params import SamplingParams
from moemesh.engine.warmup import plan, warm_up


def _engine(**cfg: object) -> Engine:
    return Engine(EngineConfig(num_threads=1, **cfg))


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 40, 130)]


def test_the_warm_up_runs_its_plan_then_leaves_no_page_hit_or_expert_count_behind():
    engine = _engine(max_num_batched_tokens=300)
    assert plan(engine) == ([128, 300], 4)
    done = warm_up(engine)
    assert (done.prefill_sizes, done.decode_batches) == ([128, 300], [4, 3, 2, 1])
    s = engine.scheduler
    assert s.num_free_pages == s.pool.num_free == s.cfg.num_pages  # the warm-up's cached pages are freed too
    assert s.cache.num_cached == 0 and s.cache.hit_rate == 0.0
    assert not engine.requests and not engine.has_unfinished()
    assert engine.expert_load is not None and int(engine.expert_load.counts.sum()) == 0


def test_outputs_after_a_warm_up_are_those_of_a_cold_engine_greedy_and_sampled():
    """Greedy, and sampled from the shared generator (no seed): the warm-up draws nothing from it."""
    cold, warm = _engine(), _engine()
    warm_up(warm)
    prompts = _prompts(cold.model.config.vocab_size)
    for params in (SamplingParams(max_tokens=12, temperature=0.0),
                   SamplingParams(max_tokens=12, temperature=1.0, top_k=20)):
        a = [c.token_ids for c in cold.generate(prompts, params)]
        b = [c.token_ids for c in warm.generate(prompts, params)]
        assert a == b


def test_a_prompt_after_the_warm_up_does_not_hit_the_warm_ups_prefixes():
    engine = _engine()
    warm_up(engine)
    vocab = engine.model.config.vocab_size
    # The warm-up's own 128-token prompt, as a request would send it: computed, not served from a cache.
    prompt = [(128 * 7 + i) % vocab for i in range(128)]
    engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))
    assert engine.scheduler.cache.hit_rate == 0.0


def test_the_plan_fits_a_small_cache_and_context():
    # 4 pages of 16 tokens: room for 32 prompt tokens alone, and a decode batch whose sequences fit together.
    engine = _engine(num_pages=4, page_size=16, max_model_len=48)
    sizes, batch = plan(engine)
    assert sizes == [32] and 1 <= batch < 4
    done = warm_up(engine)
    assert done.prefill_sizes == [32] and done.decode_batches == list(range(batch, 0, -1))
    assert engine.scheduler.num_free_pages == 4


def test_a_busy_engine_is_not_warmed_up():
    engine = _engine()
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="before it takes requests"):
        warm_up(engine)


def test_the_warm_up_says_what_it_ran(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="moemesh.engine.warmup"):
        warm_up(_engine(max_num_batched_tokens=256))
    assert any("prefill of [128, 256] tokens, decode batches 4..1" in r.getMessage() for r in caplog.records)
