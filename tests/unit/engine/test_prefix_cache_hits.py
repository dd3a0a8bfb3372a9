"""Prefix-cache hits that cover a whole prompt (page-aligned prompts sent again, prefixes of cached prompts)
against a cold run: the last prompt token must still be computed, to sample from its logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moemesh.engine.engine import Engine, EngineConfig
from moemesh.engine.sampling_params import SamplingParams

PAGE = 4
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def make(small_dir: Path, cache: bool) -> Engine:
    return Engine(EngineConfig(model=str(small_dir), dtype="float32", page_size=PAGE, kv_cache_mb=8,
                               enable_prefix_caching=cache))


@pytest.fixture(scope="module")
def cold(small_dir: Path) -> Engine:
    """The reference: the same model with no prefix cache at all."""
    return make(small_dir, cache=False)


def random_prompt(n: int, seed: int) -> list[int]:
    return torch.randint(8, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def cached_tokens_expected(prompt: list[int], cached: list[list[int]]) -> int:
    """Full pages of `prompt` a hit reuses: its longest common prefix with a cached sequence, cut to whole
    pages, and never its last token (whose logits must be computed)."""
    return min(len(prompt) - 1, max(common_prefix(prompt, seq) for seq in cached)) // PAGE * PAGE


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def assert_pages_accounted(engine: Engine) -> None:
    s = engine.scheduler
    assert s.num_unfinished == 0
    assert s.pool.num_free + s.cache.num_cached == s.cfg.num_pages
    assert s.cache.num_evictable == s.cache.num_cached


def test_full_and_partial_prompt_hits_equal_a_cold_run(small_dir: Path, cold: Engine) -> None:
    warm = make(small_dir, cache=True)
    aligned = random_prompt(4 * PAGE, seed=11)     # 16 tokens: every page full
    unaligned = random_prompt(4 * PAGE + 2, seed=12)
    first = warm.generate([aligned, unaligned], GREEDY)
    assert [c.num_cached_tokens for c in first] == [0, 0]
    # What a run leaves cached: its prompt and all outputs but the last (whose KV is never computed).
    cached = [p + c.token_ids[:-1] for p, c in zip([aligned, unaligned], first, strict=True)]
    cases = [
        ("aligned again", aligned),
        ("unaligned again", unaligned),
        ("aligned prefix of a cached prompt", aligned[: 2 * PAGE]),
        ("unaligned prefix of a cached prompt", aligned[: 2 * PAGE + 1]),
        ("cached prompt extended", aligned + [7, 8, 9]),
        ("cached prompt and output, page-aligned", aligned + first[0].token_ids[:PAGE]),
    ]
    for name, prompt in cases:
        # One at a time, each hitting what the runs before it left.
        got = warm.generate([prompt], GREEDY)[0]
        want = cold.generate([prompt], GREEDY)[0]
        assert got.num_cached_tokens == cached_tokens_expected(prompt, cached), name
        cached.append(prompt + got.token_ids[:-1])
        assert got.token_ids == want.token_ids, name
        assert_pages_accounted(warm)
    assert_pages_accounted(cold)
    assert cold.scheduler.cache.num_cached == 0


def test_same_aligned_prompt_batched_with_itself(small_dir: Path, cold: Engine) -> None:
    """Two copies of a page-aligned prompt in one batch, then two more once it is cached."""
    warm = make(small_dir, cache=True)
    prompt = random_prompt(3 * PAGE, seed=13)
    want = cold.generate([prompt], GREEDY)[0].token_ids
    for round_ in range(2):
        got = warm.generate([prompt, prompt], GREEDY)
        assert [c.token_ids for c in got] == [want, want], round_
    assert [c.num_cached_tokens for c in got] == [2 * PAGE, 2 * PAGE]
    assert_pages_accounted(warm)


def test_prefill_only_full_hit_reads_the_whole_prompt_kv(small_dir: Path) -> None:
    """PD prefill worker: a page-aligned prompt sent again still yields its first token and all its KV rows."""
    warm = make(small_dir, cache=True)
    prompt = random_prompt(3 * PAGE, seed=14)
    rows, firsts = [], []
    for _ in range(2):
        rid = warm.add_request(prompt, GREEDY, prefill_only=True)
        outs = []
        while not outs:
            outs = warm.step()
        assert [o.request_id for o in outs] == [rid] and outs[0].prefill_done
        firsts.append((outs[0].new_token_ids, outs[0].num_cached_tokens))
        rows.append(warm.read_kv(rid, 0, len(prompt)))
        warm.release(rid)
    assert firsts[0][0] == firsts[1][0]
    assert (firsts[0][1], firsts[1][1]) == (0, 2 * PAGE)
    torch.testing.assert_close(rows[1], rows[0], rtol=0, atol=0)
    assert_pages_accounted(warm)
