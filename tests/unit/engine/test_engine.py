"""The engine's outputs against recomputing the whole sequence at every step (no cache at all)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moemesh.engine.engine import Engine, EngineConfig
from moemesh.engine.sampling_params import InvalidParameter, SamplingParams
from moemesh.engine.scheduler import RequestTooLong
from moemesh.model.mla import NoCacheAttention

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by a full forward pass over the whole sequence for every token."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            h = model(torch.tensor(ids), torch.arange(len(ids)), NoCacheAttention([len(ids)]))
            t = int(model.compute_logits(h[-1:]).argmax())
            ids.append(t)
            out.append(t)
    return out


def prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(8, vocab, (n,), generator=g).tolist() for n in lengths]


def assert_no_page_leak(engine: Engine) -> None:
    s = engine.scheduler
    assert s.num_unfinished == 0
    assert s.pool.num_free + s.cache.num_cached == s.cfg.num_pages
    assert s.cache.num_evictable == s.cache.num_cached  # nothing left pinned


def make(small_dir: Path, **kw) -> Engine:
    return Engine(EngineConfig(model=str(small_dir), dtype="float32", **kw))


def test_batched_paged_chunked_equals_recompute(small_dir: Path) -> None:
    engine = make(small_dir, page_size=4, max_num_batched_tokens=9, kv_cache_mb=8)
    ps = prompts(engine.model.config.vocab_size, [1, 3, 4, 5, 17, 30])
    got = engine.generate(ps, GREEDY)
    for p, c in zip(ps, got, strict=True):
        assert c.token_ids == reference_greedy(engine.model, p, GREEDY.max_tokens)
        assert c.finish_reason == "length"
    assert_no_page_leak(engine)


def test_prefix_cache_hits_give_the_same_tokens(small_dir: Path) -> None:
    engine = make(small_dir, page_size=4, kv_cache_mb=8)
    shared = prompts(engine.model.config.vocab_size, [21])[0]
    first = engine.generate([shared + [10, 11]], GREEDY)[0]
    # Same prefix, different tails; and a prompt that is the first request's prompt plus its output.
    ps = [shared + [12, 13, 14], shared, shared + [10, 11] + first.token_ids + [9]]
    got = engine.generate(ps, GREEDY)
    assert [c.num_cached_tokens for c in got] == [20, 20, 32]  # 35 tokens, 34 with KV: 8 full pages
    for p, c in zip(ps, got, strict=True):
        assert c.token_ids == reference_greedy(engine.model, p, GREEDY.max_tokens)
    assert engine.stats()["prefix_cache_hit_rate"] > 0
    assert_no_page_leak(engine)


def test_preemption_recomputes_to_the_same_tokens(small_dir: Path) -> None:
    # 12 pages of 4 tokens: three requests that each grow to 22 tokens cannot all stay resident.
    engine = make(small_dir, page_size=4, num_pages=12, max_model_len=48)
    ps = prompts(engine.model.config.vocab_size, [10, 9, 8], seed=5)
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    got = engine.generate(ps, params)
    assert engine.scheduler.num_preemptions > 0
    for p, c in zip(ps, got, strict=True):
        assert c.token_ids == reference_greedy(engine.model, p, params.max_tokens)
    assert_no_page_leak(engine)


def test_prefix_cache_disabled_still_correct(small_dir: Path) -> None:
    engine = make(small_dir, page_size=8, enable_prefix_caching=False, kv_cache_mb=8)
    ps = prompts(engine.model.config.vocab_size, [16, 16])
    got = engine.generate([ps[0], ps[0]], GREEDY)
    assert got[0].token_ids == got[1].token_ids == reference_greedy(engine.model, ps[0], GREEDY.max_tokens)
    assert engine.scheduler.cache.num_cached == 0
    assert engine.scheduler.pool.num_free == engine.scheduler.cfg.num_pages


def test_seeded_sampling_reproducible_regardless_of_batch(small_dir: Path) -> None:
    engine = make(small_dir)
    p = prompts(engine.model.config.vocab_size, [7, 12, 5])
    seeded = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = engine.generate([p[0]], seeded)[0].token_ids
    other = SamplingParams(max_tokens=6, temperature=1.3, ignore_eos=True)
    mixed = engine.generate([p[1], p[0], p[2]], [other, seeded, other])[1].token_ids
    assert alone == mixed
    different = engine.generate([p[0]], SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=99,
                                                       ignore_eos=True))[0].token_ids
    assert different != alone


def test_stop_token_ids_max_tokens_min_tokens_and_logprobs(small_dir: Path) -> None:
    engine = make(small_dir)
    p = prompts(engine.model.config.vocab_size, [9])[0]
    free = engine.generate([p], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=3))[0]
    assert len(free.logprobs) == 10 and all(len(t) == 3 for t in free.top_logprobs)
    # Greedy picks the most likely token, so its logprob is the top one.
    assert all(abs(lp - top[0][1]) < 1e-6 and tok == top[0][0]
               for lp, top, tok in zip(free.logprobs, free.top_logprobs, free.token_ids, strict=True))
    stop_at = free.token_ids[4]
    stopped = engine.generate([p], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                  stop_token_ids=[stop_at]))[0]
    first = free.token_ids.index(stop_at)
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_at
    # min_tokens bans the stop id until it is reached, so the output differs from the stopped one.
    held = engine.generate([p], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                               stop_token_ids=[stop_at], min_tokens=first + 2))[0]
    assert len(held.token_ids) >= first + 2
    assert stop_at not in held.token_ids[: first + 1]


def test_stop_strings_cut_text_and_stream_consistently(tiny_dir: Path) -> None:
    engine = Engine(EngineConfig(model=str(tiny_dir), dtype="float32", kv_cache_mb=16))
    base = engine.generate(["Once upon a time"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert len(base.text) > 6
    stop = base.text[3:6]
    rid = engine.add_request("Once upon a time", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                               stop=[stop]))
    streamed, finished = "", None
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == rid
            streamed += out.new_text
            if out.finished:
                finished = out
    cut = base.text.index(stop)
    assert streamed == base.text[:cut]
    assert finished is not None and finished.finish_reason.value == "stop"


def test_eos_ends_a_request(small_dir: Path) -> None:
    engine = make(small_dir)
    p = prompts(engine.model.config.vocab_size, [9])[0]
    free = engine.generate([p], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    # Make the 3rd generated token the model's EOS: the same request without ignore_eos stops there.
    engine.eos_token_ids = (free.token_ids[2],)
    c = engine.generate([p], SamplingParams(max_tokens=8, temperature=0))[0]
    assert c.token_ids == free.token_ids[:3] and c.finish_reason == "stop"


def test_abort_frees_pages(small_dir: Path) -> None:
    engine = make(small_dir, page_size=4, kv_cache_mb=8)
    p = prompts(engine.model.config.vocab_size, [30, 30])
    a = engine.add_request(p[0], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    b = engine.add_request(p[1], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.scheduler.pool.num_free < engine.scheduler.cfg.num_pages
    assert engine.abort(a) and engine.abort(b)
    assert not engine.abort(a)
    assert_no_page_leak(engine)


def test_bad_input_is_refused_clearly(small_dir: Path) -> None:
    engine = make(small_dir, max_model_len=32, kv_cache_mb=8)
    with pytest.raises(RequestTooLong, match="context limit is 32"):
        engine.add_request(list(range(10, 42)))
    with pytest.raises(RequestTooLong, match="empty"):
        engine.add_request([])
    with pytest.raises(InvalidParameter, match=r"token ids must be in \[0, 512\)"):
        engine.add_request([5, 100000])
    with pytest.raises(InvalidParameter, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(InvalidParameter, match="max_tokens"):
        SamplingParams(max_tokens=0)
    # A request that reaches the context limit ends with "length", not an error.
    c = engine.generate([list(range(10, 30))], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 12
