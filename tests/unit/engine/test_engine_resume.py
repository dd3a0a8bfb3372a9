"""A migrated request (`Resume`) continues exactly where its previous worker stopped: same tokens, same
text (nothing repeated, nothing missing), same stop, with greedy and with seeded sampling."""

from __future__ import annotations

from pathlib import Path

import pytest

from moemesh.engine.engine import Engine, EngineConfig, InvalidParameter, Resume
from moemesh.engine.sampling_params import SamplingParams

PROMPT = "Once upon a time, the mesh"


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> Engine:
    return Engine(EngineConfig(model=str(tiny_dir), dtype="float32", kv_cache_mb=32))


def _run(engine: Engine, params: SamplingParams, resume: Resume | None = None) -> tuple[list[int], str, str]:
    rid = engine.add_request(PROMPT, params, resume=resume)
    tokens, text, finish = [], "", ""
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid:
                tokens += out.new_token_ids
                text += out.new_text
                finish = out.finish_reason.value if out.finish_reason else finish
    return tokens, text, finish


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.5),
], ids=["greedy", "seeded", "penalties"])
@pytest.mark.parametrize("cut", [1, 9, 23])
def test_resumed_request_continues_the_same_stream(engine: Engine, params: SamplingParams, cut: int) -> None:
    tokens, text, finish = _run(engine, params)
    assert len(tokens) == 24
    head_text = engine.tokenizer.decode(tokens[:cut])
    # The client may have less text than the tokens decode to (held back, incomplete characters).
    chars = max(0, len(head_text) - 2)
    rest, rest_text, rest_finish = _run(engine, params, Resume(tokens[:cut], chars))
    assert tokens[:cut] + rest == tokens
    assert head_text[:chars] + rest_text == text
    assert rest_finish == finish == "length"


def test_resume_honours_stop_strings_across_the_cut(engine: Engine) -> None:
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    tokens, text, _ = _run(engine, greedy)
    stop = text[10:13]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
    full, full_text, full_finish = _run(engine, params)
    cut = 2
    head_text = engine.tokenizer.decode(tokens[:cut])
    rest, rest_text, rest_finish = _run(engine, params, Resume(tokens[:cut], len(head_text)))
    assert tokens[:cut] + rest == full and head_text + rest_text == full_text
    assert rest_finish == full_finish == "stop"


def test_resume_beyond_max_tokens_or_vocab_is_refused(engine: Engine) -> None:
    with pytest.raises(InvalidParameter, match="max_tokens"):
        engine.add_request(PROMPT, SamplingParams(max_tokens=3), resume=Resume([1, 2, 3]))
    with pytest.raises(InvalidParameter, match="resume_token_ids"):
        engine.add_request(PROMPT, SamplingParams(max_tokens=8), resume=Resume([10**6]))
