"""The prefill step's bound on new prompts' tokens (`SchedulerConfig.max_prefill_tokens`, the workers'
--max-prefill-tokens): prompts arriving together leave in short steps; the first always goes; cached prefixes do not
count; chunking and outputs are unchanged."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from moemesh.engine.engine import Engine, EngineConfig
from moemesh.engine.request import Request
from moemesh.engine.sampling_params import SamplingParams
from moemesh.engine.scheduler import Scheduler, SchedulerConfig
from moemesh.worker.engine_args import add_engine_arguments, engine_config

PAGE = 16


def scheduler(max_prefill_tokens: int | None, budget: int = 512) -> Scheduler:
    return Scheduler(SchedulerConfig(num_pages=256, page_size=PAGE, max_model_len=1024,
                                     max_num_batched_tokens=budget, max_prefill_tokens=max_prefill_tokens))


def request(rid: str, prompt: list[int]) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=4))


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 1000 + 2 for i in range(n)]


def prefill_steps(s: Scheduler) -> list[list[tuple[str, int]]]:
    """Schedule until no prefill is left: each prefill step's (request id, tokens computed)."""
    steps = []
    while (batch := s.schedule()) is not None and batch.is_prefill:
        steps.append([(q.request.request_id, q.num_new_tokens) for q in batch.seqs])
        s.on_step_done(batch)
    return steps


@pytest.mark.parametrize(("bound", "expected"), [
    (None, [[("a", 128), ("b", 128), ("c", 128), ("d", 128)]]),
    (256, [[("a", 128), ("b", 128)], [("c", 128), ("d", 128)]]),
    (255, [[("a", 128)], [("b", 128)], [("c", 128)], [("d", 128)]]),
    (400, [[("a", 128), ("b", 128), ("c", 128)], [("d", 128)]]),
])
def test_prompts_arriving_together_leave_in_steps_of_at_most_the_bound(bound: int | None, expected) -> None:
    s = scheduler(bound)
    for i, rid in enumerate("abcd"):
        s.add(request(rid, prompt(i, 128)))
    assert prefill_steps(s) == expected


def test_the_first_prompt_always_goes_and_a_long_one_is_still_chunked_by_the_step_budget() -> None:
    s = scheduler(256, budget=512)
    s.add(request("long", prompt(0, 700)))
    s.add(request("short", prompt(1, 64)))
    # 700 > 256 goes alone, chunked at 512; its last 188-token chunk continues first, and the short prompt (64)
    # joins it: the bound counts new prompts' tokens only.
    assert prefill_steps(s) == [[("long", 512)], [("long", 188), ("short", 64)]]


def test_a_cached_prefix_does_not_count_and_looking_does_not_count_as_a_cache_query() -> None:
    s = scheduler(200)
    shared = prompt(5, 160)
    s.add(request("first", shared + [3, 4]))
    assert prefill_steps(s) == [[("first", 162)]]  # its 160 full-page tokens are now in the prefix cache
    hit_rate = s.cache.hit_rate
    s.add(request("new", prompt(6, 150)))
    s.add(request("hit", shared + [5, 6, 7]))  # 163 tokens, 160 of them cached: 3 to compute
    assert s.cache.prefix_tokens(shared + [5, 6]) == 160
    assert s.cache.hit_rate == hit_rate  # the look marked and counted nothing
    assert prefill_steps(s) == [[("new", 150), ("hit", 3)]]


def test_a_bound_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_prefill_tokens must be >= 1"):
        scheduler(0)


def test_the_workers_option_sets_the_bound_and_0_or_nothing_leaves_the_step_budget() -> None:
    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    assert engine_config(p.parse_args([])).max_prefill_tokens is None
    assert engine_config(p.parse_args(["--max-prefill-tokens", "0"])).max_prefill_tokens is None
    assert engine_config(p.parse_args(["--max-prefill-tokens", "96"])).max_prefill_tokens == 96
    with pytest.raises(SystemExit):
        p.parse_args(["--max-prefill-tokens", "-1"])


def test_outputs_do_not_depend_on_how_a_burst_is_split(tiny_dir: Path) -> None:
    prompts = [prompt(i, 24 + 8 * i) for i in range(4)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    results = {}
    for bound in (None, 24):
        engine = Engine(EngineConfig(model=str(tiny_dir), dtype="float32", page_size=8, kv_cache_mb=8,
                                     max_prefill_tokens=bound, enable_prefix_caching=False))
        steps: list[int] = []  # sequences per prefill step
        schedule = engine.scheduler.schedule

        def recorded(schedule=schedule, steps=steps):
            batch = schedule()
            if batch is not None and batch.is_prefill:
                steps.append(len(batch.seqs))
            return batch

        engine.scheduler.schedule = recorded
        for p in prompts:
            engine.add_request(p, params)
        outputs: dict[str, list[int]] = {}
        while engine.scheduler.has_work:
            for o in engine.step():
                outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
        results[bound] = (steps, [outputs[k] for k in sorted(outputs)])
    assert results[None][0] == [4] and results[24][0] == [1, 1, 1, 1]
    assert results[None][1] == results[24][1]
