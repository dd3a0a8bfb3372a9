"""The batched sampler: greedy, bans, penalties, truncation, seeded reproducibility, logprobs."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import pytest
import torch

from moemesh.engine.sampling import (
    Sampler,
    SamplingRow,
    apply_penalties,
    truncated_probs,
)
from moemesh.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def _row(
    params: SamplingParams = GREEDY,
    seed: int | None = None,
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
    banned: Sequence[int] = (),
) -> SamplingRow:
    generator = Sampler.make_generator(seed) if seed is not None else None
    return SamplingRow(params, generator, prompt, output, banned)


def _logits(b: int, v: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def _shared_sampler(seed: int = 1234) -> Sampler:
    return Sampler(torch.Generator().manual_seed(seed))


def _chi_square(tokens: list[int], probs: torch.Tensor) -> float:
    """Pearson's statistic of observed token counts against expected probabilities [V]."""
    n = len(tokens)
    counts = Counter(tokens)
    return sum((counts.get(t, 0) - n * p) ** 2 / (n * p) for t, p in enumerate(probs.tolist()))


# --- greedy --------------------------------------------------------------------------------------

@pytest.mark.parametrize("logprobs", [None, 0])  # the argmax fast path and the general path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax(logprobs: int | None, dtype: torch.dtype) -> None:
    logits = _logits(8, 64).to(dtype)
    rows = [_row(SamplingParams(temperature=0.0, logprobs=logprobs)) for _ in range(8)]
    assert Sampler()(logits, rows).token_ids == logits.float().argmax(-1).tolist()


@pytest.mark.parametrize("logprobs", [None, 0])
def test_greedy_ties_take_the_lowest_id(logprobs: int | None) -> None:
    logits = torch.zeros(1, 10)
    logits[0, [7, 3, 5]] = 2.0
    rows = [_row(SamplingParams(temperature=0.0, logprobs=logprobs))]
    assert Sampler()(logits, rows).token_ids == [3]


def test_sampler_does_not_modify_the_logits() -> None:
    logits = _logits(3, 40)
    before = logits.clone()
    rows = [
        _row(SamplingParams(temperature=0.0, repetition_penalty=1.5), output=[1, 2],
             banned=[int(logits[0].argmax())]),
        _row(SamplingParams(temperature=0.7, top_k=5, top_p=0.5, min_p=0.1), seed=1, banned=[0]),
        _row(),
    ]
    Sampler()(logits, rows)
    assert torch.equal(logits, before)


def test_empty_batch() -> None:
    result = Sampler()(torch.empty(0, 10), [])
    assert (result.token_ids, result.logprobs, result.top_logprobs) == ([], [], [])


def test_rejects_mismatched_shapes_and_out_of_range_ids() -> None:
    with pytest.raises(ValueError, match="len"):
        Sampler()(torch.zeros(2, 10), [_row()])
    with pytest.raises(ValueError, match="banned_token_ids"):
        Sampler()(torch.zeros(1, 10), [_row(banned=[10])])
    with pytest.raises(ValueError, match="token ids"):
        penalised = SamplingParams(temperature=0.0, frequency_penalty=1)
        Sampler()(torch.zeros(1, 10), [_row(penalised, output=[12])])


# --- bans ----------------------------------------------------------------------------------------

def test_banned_tokens_are_never_chosen() -> None:
    logits = torch.zeros(1, 20)
    logits[0, 4], logits[0, 9], logits[0, 11] = 30.0, 29.0, 5.0
    banned = [4, 9]

    greedy = Sampler()(logits, [_row(banned=banned)])
    assert greedy.token_ids == [11]

    n = 500
    batch = logits.expand(n, -1)
    rows = [_row(SamplingParams(temperature=2.0, logprobs=0), seed=i if i % 2 else None, banned=banned)
            for i in range(n)]
    result = _shared_sampler()(batch, rows)
    assert not set(result.token_ids) & set(banned)
    # Without the ban the heavy tokens dominate, so the check above is not vacuous.
    unbanned = _shared_sampler()(batch[:10], [_row(SamplingParams(temperature=2.0), seed=1)] * 10)
    assert set(unbanned.token_ids) & set(banned)
    assert all(math.isfinite(lp) for lp in result.logprobs if lp is not None)


# --- penalties -----------------------------------------------------------------------------------

def _reference_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt: Sequence[int], output: Sequence[int]
) -> torch.Tensor:
    """The formulas, one token at a time in plain Python."""
    out = logits.tolist()
    for t in set(prompt) | set(output):
        r = params.repetition_penalty
        out[t] = out[t] / r if out[t] > 0 else out[t] * r
    for t, c in Counter(output).items():
        out[t] -= params.frequency_penalty * c + params.presence_penalty
    return torch.tensor(out)


def test_penalties_match_the_formulas() -> None:
    v = 30
    logits = _logits(5, v, seed=3)
    cases = [
        (SamplingParams(repetition_penalty=1.7), [1, 2, 2, 29], [3, 3, 5]),
        (SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), [1, 2, 3], [3, 3, 3, 7, 0]),
        (SamplingParams(repetition_penalty=0.6, frequency_penalty=-1.0, presence_penalty=2.0),
         [4, 4, 8], [8, 9, 9]),
        (SamplingParams(), [1, 2, 3], [1, 2]),  # no penalties: untouched
        (SamplingParams(frequency_penalty=1.0, repetition_penalty=1.3), list(range(20)), []),  # first step
    ]
    rows = [_row(p, prompt=pr, output=o) for p, pr, o in cases]
    got = logits.clone()
    apply_penalties(got, rows)
    for i, (params, prompt, output) in enumerate(cases):
        expected = _reference_penalties(logits[i], params, prompt, output)
        torch.testing.assert_close(got[i], expected, rtol=0, atol=1e-5)
        assert torch.equal(got[i], logits[i]) == (not params.has_penalties)


def test_penalties_steer_greedy_choice() -> None:
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.5]])
    assert Sampler()(logits, [_row(output=[0])]).token_ids == [0]
    rep = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    assert Sampler()(logits, [_row(rep, prompt=[0])]).token_ids == [1]
    freq = SamplingParams(temperature=0.0, frequency_penalty=0.2)
    assert Sampler()(logits, [_row(freq, output=[0])]).token_ids == [1]
    pres = SamplingParams(temperature=0.0, presence_penalty=-2.0)
    assert Sampler()(logits, [_row(pres, output=[3])]).token_ids == [3]


# --- truncation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [SamplingParams(top_k=1), SamplingParams(top_p=1e-6),
                                    SamplingParams(top_k=1, temperature=5.0)])
def test_extreme_truncation_equals_greedy(params: SamplingParams) -> None:
    logits = _logits(16, 200, seed=5)
    logits[3, [17, 42]] = 50.0  # a tie: the lowest id wins, as in argmax
    expected = logits.argmax(-1).tolist()
    for seed in range(5):
        rows = [_row(params, seed=seed * 100 + i if i % 2 else None) for i in range(16)]
        assert _shared_sampler(seed)(logits, rows).token_ids == expected
    assert expected[3] == 17


PROBS = torch.tensor([0.4, 0.3, 0.19, 0.11])


@pytest.mark.parametrize(
    ("params", "kept"),
    [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_k=3), {0, 1, 2}),
        (SamplingParams(top_k=0), {0, 1, 2, 3}),  # 0 and -1 disable top-k
        (SamplingParams(top_p=0.65), {0, 1}),
        (SamplingParams(top_p=0.75), {0, 1, 2}),
        (SamplingParams(top_p=1.0), {0, 1, 2, 3}),
        (SamplingParams(min_p=0.5), {0, 1}),  # 0.19 < 0.5 * 0.4
        (SamplingParams(min_p=0.25), {0, 1, 2, 3}),
        (SamplingParams(top_k=3, min_p=0.5), {0, 1}),
        # top-p sees the top-k-renormalised distribution: 0.4 / 0.7 >= 0.5 is enough alone.
        (SamplingParams(top_k=2, top_p=0.5), {0}),
        (SamplingParams(top_p=0.5), {0, 1}),
        (SamplingParams(top_k=3, top_p=0.4), {0}),
    ],
)
def test_truncation_keeps_the_expected_tokens(params: SamplingParams, kept: set[int]) -> None:
    logits = PROBS.log().expand(2000, -1)
    probs = truncated_probs(logits[:1].clone(), [params])[0]
    assert {i for i, p in enumerate(probs.tolist()) if p > 0} == kept
    tokens = _shared_sampler()(logits, [_row(params)] * 2000).token_ids
    assert set(tokens) == kept


def test_truncated_probs_are_the_renormalisable_softmax() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    probs = truncated_probs(logits.clone(), [SamplingParams(temperature=0.5, top_k=2)])
    expected = torch.softmax(torch.tensor([-math.inf, 4.0, 6.0, -math.inf]), dim=-1)
    torch.testing.assert_close(probs[0] / probs[0].sum(), expected)


# --- random sampling: reproducibility and distribution --------------------------------------------

def _run_steps(logits: torch.Tensor, make_rows, steps: int = 6) -> list[list[int]]:
    """Sample `steps` times with rows built once (their generators advance across steps)."""
    rows = make_rows()
    sampler = _shared_sampler(99)
    return [sampler(logits, rows).token_ids for _ in range(steps)]


def test_seeded_rows_reproduce_across_calls_batches_and_order() -> None:
    v = 1000
    mine = _logits(1, v, seed=7) * 0.1  # flat, so the draws decide
    others = _logits(4, v, seed=8) * 0.1
    params = SamplingParams(temperature=1.0, top_p=0.95)

    alone = [t[0] for t in _run_steps(mine, lambda: [_row(params, seed=42)])]
    again = [t[0] for t in _run_steps(mine, lambda: [_row(params, seed=42)])]
    assert alone == again

    batch = torch.cat([others[:1], mine, others[1:]])

    def crowd() -> list[SamplingRow]:
        return [_row(params, seed=1), _row(params, seed=42), _row(params),
                _row(SamplingParams(temperature=0.0)), _row(SamplingParams(temperature=1.3), seed=42)]

    in_batch = [t[1] for t in _run_steps(batch, crowd)]
    assert in_batch == alone
    in_reversed = [t[3] for t in _run_steps(batch.flip(0), lambda: crowd()[::-1])]
    assert in_reversed == alone

    assert len(set(alone)) > 1  # the generator advances between steps


def test_different_seeds_give_different_tokens() -> None:
    logits = _logits(1, 1000, seed=7) * 0.1
    params = SamplingParams(temperature=1.0)
    runs = {tuple(t[0] for t in _run_steps(logits, lambda s=s: [_row(params, seed=s)])) for s in range(8)}
    assert len(runs) == 8


def test_unseeded_rows_follow_the_shared_generator() -> None:
    logits = _logits(4, 1000, seed=7) * 0.1
    rows = [_row(SamplingParams())] * 4
    assert _shared_sampler(5)(logits, rows).token_ids == _shared_sampler(5)(logits, rows).token_ids
    assert _shared_sampler(5)(logits, rows).token_ids != _shared_sampler(6)(logits, rows).token_ids


LOGITS = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
# chi-square with 5 degrees of freedom exceeds 25 with probability < 2e-4; the seeds are fixed anyway.
CHI2_BOUND = 25.0


@pytest.mark.parametrize("seeded", [False, True])
def test_empirical_distribution_matches_softmax(seeded: bool) -> None:
    n = 20000 if not seeded else 5000
    rows = [_row(SamplingParams(), seed=i if seeded else None) for i in range(n)]
    tokens = _shared_sampler(7)(LOGITS.expand(n, -1), rows).token_ids
    assert _chi_square(tokens, torch.softmax(LOGITS, -1)) < CHI2_BOUND
    # The bound discriminates: the same draws are far from a uniform distribution.
    assert _chi_square(tokens, torch.full((6,), 1 / 6)) > 10 * CHI2_BOUND


@pytest.mark.parametrize("temperature", [0.5, 2.5])
def test_temperature_scales_the_distribution(temperature: float) -> None:
    n = 20000
    rows = [_row(SamplingParams(temperature=temperature))] * n
    tokens = _shared_sampler(11)(LOGITS.expand(n, -1), rows).token_ids
    assert _chi_square(tokens, torch.softmax(LOGITS / temperature, -1)) < CHI2_BOUND
    assert _chi_square(tokens, torch.softmax(LOGITS, -1)) > 10 * CHI2_BOUND


def test_low_temperature_is_nearly_greedy() -> None:
    n = 2000
    tokens = _shared_sampler()(LOGITS.expand(n, -1), [_row(SamplingParams(temperature=0.05))] * n).token_ids
    assert Counter(tokens).most_common(1)[0] == (5, n)


# --- logprobs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_those_of_the_raw_logits(dtype: torch.dtype) -> None:
    logits = _logits(5, 50, seed=13).to(dtype)
    rows = [
        _row(SamplingParams(temperature=0.0, logprobs=5, repetition_penalty=2.0), prompt=[1, 2, 3]),
        _row(SamplingParams(temperature=0.7, top_k=10, logprobs=3, frequency_penalty=1.0),
             seed=3, output=[4]),
        _row(SamplingParams(temperature=1.0, logprobs=0), banned=[int(logits[2].float().argmax())]),
        _row(SamplingParams(temperature=1.0, min_p=0.2)),
        _row(SamplingParams(temperature=0.0, logprobs=20)),
    ]
    result = Sampler()(logits, rows)
    raw = torch.log_softmax(logits.float(), dim=-1)
    for i, row in enumerate(rows):
        n = row.params.logprobs
        if n is None:
            assert result.logprobs[i] is None and result.top_logprobs[i] is None
            continue
        assert result.logprobs[i] == pytest.approx(raw[i, result.token_ids[i]].item(), abs=1e-6)
        if n == 0:
            assert result.top_logprobs[i] is None
            continue
        top = result.top_logprobs[i]
        assert top is not None and len(top) == n
        values = [lp for _, lp in top]
        assert values == sorted(values, reverse=True)
        expected = raw[i].topk(n)
        assert [t for t, _ in top] == expected.indices.tolist()
        assert values == pytest.approx(expected.values.tolist(), abs=1e-6)
    # The banned row's choice differs from the raw argmax, yet its reported logprob is the raw one.
    assert result.token_ids[2] != int(raw[2].argmax())


def test_make_generator_is_deterministic() -> None:
    a = torch.rand(5, generator=Sampler.make_generator(17))
    b = torch.rand(5, generator=Sampler.make_generator(17))
    c = torch.rand(5, generator=Sampler.make_generator(18))
    assert torch.equal(a, b) and not torch.equal(a, c)
