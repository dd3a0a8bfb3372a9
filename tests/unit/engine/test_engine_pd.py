"""Disaggregation inside the engine: one engine prefills, another receives the KV rows and decodes."""

from __future__ import annotations

from pathlib import Path

import torch

from moemesh.engine.engine import Engine, EngineConfig
from moemesh.engine.request import RequestStatus
from moemesh.engine.sampling_params import SamplingParams


def pd_generate(prefill: Engine, decode: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    rid = prefill.add_request(prompt, params, prefill_only=True)
    first = None
    while first is None:
        for out in prefill.step():
            assert out.prefill_done
            first = out
    rows = prefill.read_kv(rid, 0, len(prompt))
    prefill.release(rid)
    did = decode.reserve_request(prompt, params)
    decode.step()  # admits the reservation
    assert decode.take_reserved() == [did]
    # Chunks in arbitrary sizes, out of order: rows land by position.
    cut = len(prompt) // 3
    decode.write_kv(did, cut, rows[:, cut:])
    decode.write_kv(did, 0, rows[:, :cut])
    tokens = [first.new_token_ids[0]]
    out = decode.commit_transfer(did, first.new_token_ids[0], first.new_logprobs[0] if first.new_logprobs else None)
    done = out.finished
    while not done:
        for out in decode.step():
            if out.request_id == did:
                tokens += out.new_token_ids
                done = out.finished
    return tokens


def test_pd_equals_colocated_greedy_and_seeded(small_dir: Path) -> None:
    cfg = EngineConfig(model=str(small_dir), dtype="float32", page_size=4, kv_cache_mb=8)
    colocated, prefill, decode = Engine(cfg), Engine(cfg), Engine(cfg)
    g = torch.Generator().manual_seed(2)
    for n, params in [(13, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)),
                      (22, SamplingParams(max_tokens=10, temperature=0.9, seed=77, ignore_eos=True))]:
        prompt = torch.randint(8, 512, (n,), generator=g).tolist()
        want = colocated.generate([prompt], params)[0].token_ids
        assert pd_generate(prefill, decode, prompt, params) == want
    for engine in (prefill, decode):
        s = engine.scheduler
        assert s.num_unfinished == 0 and s.pool.num_free + s.cache.num_cached == s.cfg.num_pages


def test_aborting_a_reserved_request_frees_its_pages(small_dir: Path) -> None:
    engine = Engine(EngineConfig(model=str(small_dir), dtype="float32", page_size=4, kv_cache_mb=8))
    rid = engine.reserve_request(list(range(10, 40)), SamplingParams(max_tokens=4))
    engine.step()
    assert engine.requests[rid].status is RequestStatus.TRANSFERRING
    assert engine.scheduler.pool.num_free == engine.scheduler.cfg.num_pages - 8
    assert engine.abort(rid)
    assert engine.scheduler.pool.num_free == engine.scheduler.cfg.num_pages


def _first_outputs(prefill: Engine, decode: Engine, prompt: list[int], params: SamplingParams):
    """The prefill engine's first-token output and the decode engine's first output (its commit) for `prompt`."""
    rid = prefill.add_request(prompt, params, prefill_only=True)
    first = None
    while first is None:
        outs = prefill.step()
        first = outs[0] if outs else None
    rows = prefill.read_kv(rid, 0, len(prompt))
    prefill.release(rid)
    did = decode.reserve_request(prompt, params)
    decode.step()
    decode.take_reserved()
    decode.write_kv(did, 0, rows)
    token = first.new_token_ids[0]
    out = decode.commit_transfer(did, token, first.new_logprobs[0] if first.new_logprobs else None)
    if not out.finished:
        decode.abort(did)
    return first, out


def test_the_prefill_first_text_is_where_the_decode_output_begins(small_dir: Path) -> None:
    """PD's early first token: the text the prefill side reports is a prefix of the decode side's first output
    (equal unless that output ends the request and flushes), and none is reported where that is not sure."""
    cfg = EngineConfig(model=str(small_dir), dtype="float32", page_size=4, kv_cache_mb=8)
    prefill, decode = Engine(cfg), Engine(cfg)
    assert prefill.tokenizer is not None
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(8, 512, (11,), generator=g).tolist()
    first, out = _first_outputs(prefill, decode, prompt, SamplingParams(max_tokens=5, temperature=0))
    token = first.new_token_ids[0]
    assert first.first_text is not None and out.new_token_ids == [token] and not out.finished
    assert out.new_text == first.first_text
    for params in (SamplingParams(max_tokens=1, temperature=0),  # ends on it: the decode side flushes
                   SamplingParams(max_tokens=5, temperature=0, stop_token_ids=(token,)),
                   SamplingParams(max_tokens=5, temperature=0.8, seed=3, logprobs=2)):
        first, out = _first_outputs(prefill, decode, prompt, params)
        assert first.first_text is not None and out.new_text.startswith(first.first_text)
        assert out.new_token_ids == first.new_token_ids
    for params in (SamplingParams(max_tokens=5, temperature=0, stop=("zz",)),
                   SamplingParams(max_tokens=5, temperature=0, prompt_logprobs=0)):
        first, _ = _first_outputs(prefill, decode, prompt, params)
        assert first.first_text is None
    for engine in (prefill, decode):
        s = engine.scheduler
        assert s.num_unfinished == 0 and s.pool.num_free + s.cache.num_cached == s.cfg.num_pages
