"""`--ep-gemm onednn`: an EP rank's grouped GEMM on prepacked bf16 weights gives the plain torch GEMM's bits."""

from __future__ import annotations

import pytest
import torch

from moemesh.ep.experts import TorchGroupedGemm, make_grouped_gemm
from moemesh.ep.onednn_gemm import OneDnnGroupedGemm
from moemesh.kernels import onednn

S, D, INTER = 6, 256, 128


@pytest.fixture(autouse=True)
def _needs_onednn_bf16() -> None:
    why_not = onednn.supported(torch.bfloat16, torch.device("cpu"))  # a property of the CPU: skip, saying why
    if why_not:
        pytest.skip(why_not)


def _weights() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(S, 2 * INTER, D, generator=g) * 0.05).to(torch.bfloat16)
    w2 = (torch.randn(S, D, INTER, generator=g) * 0.05).to(torch.bfloat16)
    return w13, w2


def test_contiguous_and_masked_layouts_match_plain_torch() -> None:
    w13, w2 = _weights()
    gemm = make_grouped_gemm("onednn")
    assert isinstance(gemm, OneDnnGroupedGemm)
    packed, plain = gemm.prepare(w13, w2), TorchGroupedGemm().prepare(w13, w2)
    counts = [3, 0, 5, 1, 0, 2]
    xs = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.inference_mode():
        expected = TorchGroupedGemm().contiguous(xs, counts, plain)
        assert torch.equal(gemm.contiguous(xs, counts, packed), expected)
        # The same rows in the masked layout: [S, C, D] with each slot's rows first, garbage after.
        cap = max(counts)
        masked_in = torch.full((S, cap, D), 7.0, dtype=torch.bfloat16)
        start = 0
        for s, n in enumerate(counts):
            masked_in[s, :n] = xs[start:start + n]
            start += n
        out = gemm.masked(masked_in, torch.tensor(counts), packed)
    start = 0
    for s, n in enumerate(counts):
        assert torch.equal(out[s, :n], expected[start:start + n])
        start += n
    assert expected.abs().max() > 0.01


def test_refuses_weights_it_cannot_run() -> None:
    w13, w2 = _weights()
    with pytest.raises(ValueError, match="bfloat16 weights"):
        OneDnnGroupedGemm().prepare(w13.float(), w2.float())


def test_a_switch_repacks_only_the_slots_it_wrote() -> None:
    """`prepare_slots` after a placement switch wrote slots 1 and 4 in place: those two are packed again (their
    outputs are a fresh `prepare`'s bits, no longer the old weights'), every other slot keeps its packed copy."""
    w13, w2 = _weights()
    gemm = OneDnnGroupedGemm()
    packed = gemm.prepare(w13, w2)
    kept = {s: (packed.w13[s], packed.w2[s]) for s in range(S)}
    counts = [2] * S
    xs = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.inference_mode():
        before = gemm.contiguous(xs, counts, packed)
        g = torch.Generator().manual_seed(3)
        for s in (1, 4):  # as EPExperts.switch_slots writes a moved expert: in place, into the layer's tensors
            w13[s].copy_((torch.randn(2 * INTER, D, generator=g) * 0.05).to(torch.bfloat16))
            w2[s].copy_((torch.randn(D, INTER, generator=g) * 0.05).to(torch.bfloat16))
        updated = gemm.prepare_slots(packed, w13, w2, [1, 4])
        after = gemm.contiguous(xs, counts, updated)
        fresh = gemm.contiguous(xs, counts, gemm.prepare(w13, w2))
    assert torch.equal(after, fresh)
    rows = {s: slice(2 * s, 2 * s + 2) for s in range(S)}
    for s in range(S):
        assert (updated.w13[s] is kept[s][0]) is (s not in (1, 4))
        assert torch.equal(after[rows[s]], before[rows[s]]) is (s not in (1, 4))
