"""`--ep-gemm grouped_mm`: `torch._grouped_mm` over all slots gives TorchGroupedGemm's results in both layouts, alone
and as the routed experts of a one-rank EP model, and refuses what it cannot run naming the alternative.

Results are compared within rounding of the dtype, not bit for bit: torch's GPU kernel (CUTLASS) sums in another order
than cuBLAS. On a CPU torch runs one mm per group, TorchGroupedGemm's own, so the bits happen to be equal there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from moemesh.ep import grouped_mm
from moemesh.ep.dispatch import Received, Stages
from moemesh.ep.experts import EPExperts, TorchGroupedGemm, make_grouped_gemm
from moemesh.ep.grouped_mm import TorchGroupedMmGemm, unsupported
from moemesh.ep.placement import ExpertPlacement
from moemesh.model.loader import load_model
from moemesh.model.moe import MoE
from tests.unit.ep.test_tbo_stages import LoopbackDispatcher, max_diff, plain_logits

S, D, INTER = 6, 64, 32
COUNTS = {"gaps": [3, 0, 5, 1, 0, 2], "one-slot": [0, 0, 9, 0, 0, 0], "ends": [4, 0, 0, 0, 0, 3], "no-rows": [0] * S}
# Largest difference allowed, relative to the largest output: a few units in the last place of the dtype.
TOL = {torch.bfloat16: 2.0 ** -6, torch.float32: 1e-5}
GARBAGE = 1e4  # rows past a slot's count in the masked layout: large, so any that leaked would show


def _gpu_ok() -> bool:
    return torch.cuda.is_available() and unsupported(torch.device("cuda"), torch.bfloat16, D, INTER) is None


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _gpu_ok(), reason="no sm90/sm100 GPU"))]


def _weights(dtype: torch.dtype, device: str = "cpu", d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w13 = torch.randn(S, 2 * INTER, d, generator=g) * d ** -0.5
    w2 = torch.randn(S, d, INTER, generator=g) * INTER ** -0.5
    return w13.to(device, dtype), w2.to(device, dtype)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if ref.numel():
        scale = ref.abs().max().float()
        assert scale > 0.1  # the experts did compute something
        assert (out.float() - ref.float()).abs().max() <= TOL[dtype] * scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("counts", list(COUNTS.values()), ids=list(COUNTS))
def test_both_layouts_match_plain_torch(counts: list[int], dtype: torch.dtype, device: str) -> None:
    w13, w2 = _weights(dtype, device)
    gemm = make_grouped_gemm("grouped_mm")
    assert isinstance(gemm, TorchGroupedMmGemm)
    mine, plain = gemm.prepare(w13, w2), TorchGroupedGemm().prepare(w13, w2)
    xs = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    # The same rows in the masked layout: [S, C, D], each slot's rows first, garbage after.
    masked_in = torch.full((S, max(counts), D), GARBAGE, dtype=dtype, device=device)
    start = 0
    for s, n in enumerate(counts):
        masked_in[s, :n] = xs[start:start + n]
        start += n
    with torch.inference_mode():
        expected = TorchGroupedGemm().contiguous(xs, counts, plain)
        _assert_close(gemm.contiguous(xs, counts, mine), expected, dtype)
        out = gemm.masked(masked_in, torch.tensor(counts, device=device), mine)
        assert out.shape == masked_in.shape
        _assert_close(torch.cat([out[s, :n] for s, n in enumerate(counts)]), expected, dtype)


class MaskedLoopback(LoopbackDispatcher):
    """The one-rank dispatcher handing the experts the masked layout (as DeepEP's low-latency mode does)."""

    def dispatch_stages(self, x: torch.Tensor, phys_ids: torch.Tensor, weights: torch.Tensor
                        ) -> Stages[tuple[Received, Any]]:
        received, handle = yield from super().dispatch_stages(x, phys_ids, weights)
        slots = received.slots  # [N]
        counts = torch.bincount(slots, minlength=self.placement.slots_per_rank)  # [S]
        order = torch.argsort(slots, stable=True)
        row = torch.empty_like(slots)
        row[order] = torch.arange(slots.numel()) - (torch.cumsum(counts, 0) - counts)[slots[order]]
        xs = torch.full((counts.numel(), int(counts.max()), x.shape[1]), GARBAGE, dtype=x.dtype)
        xs[slots, row] = received.x
        return Received(xs, counts=counts), (handle, slots, row)

    def combine_stages(self, y: torch.Tensor, handle: Any) -> Stages[torch.Tensor]:
        inner, slots, row = handle
        return (yield from super().combine_stages(y[slots, row], inner))


@pytest.mark.parametrize("dispatcher", [LoopbackDispatcher, MaskedLoopback], ids=["contiguous", "masked"])
def test_one_rank_ep_model_matches_the_torch_gemm(small_dir: Path, dispatcher: type[LoopbackDispatcher]) -> None:
    logits = {}
    for gemm in ("torch", "grouped_mm"):
        model = load_model(small_dir, dtype="bfloat16")
        moes = [m for m in model.modules() if isinstance(m, MoE)]
        placement = ExpertPlacement.default(len(moes), moes[0].experts.num_experts, 1, redundant=2)
        disp = dispatcher(placement)
        for layer, moe in enumerate(moes):
            moe.experts = EPExperts(moe.experts, layer, placement, disp, gemm)
        assert isinstance(moes[0].experts.gemm, TorchGroupedMmGemm) == (gemm == "grouped_mm")
        logits[gemm] = plain_logits(model)
    assert max_diff(logits["torch"], logits["grouped_mm"]) <= TOL[torch.bfloat16] * max(
        t.abs().max().item() for t in logits["torch"])


def test_refuses_what_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    gemm = TorchGroupedMmGemm()
    for (w13, w2), why in ((_weights(torch.float64), "takes bfloat16, float16 or float32, got torch.float64"),
                           (_weights(torch.bfloat16, d=60), "multiples of 8 .* got D=60, I=32"),
                           (_weights(torch.float32, "meta"), "CPU or a CUDA GPU, got device meta")):
        with pytest.raises(ValueError, match=f"grouped GEMM 'grouped_mm' .*{why}.*; use grouped GEMM 'torch'"):
            gemm.prepare(w13, w2)
    xs, weights = torch.randn(5, D).bfloat16(), gemm.prepare(*_weights(torch.bfloat16))
    for counts in ([1, 1, 1, 1, 0, 0], [1, 1, 3]):  # too few rows; too few slots
        with pytest.raises(ValueError, match="counts must give the rows of each of the 6 slots"):
            gemm.contiguous(xs, counts, weights)
    # GPUs: only those torch has the grouped kernel for, in bf16 (capabilities stand in for the devices).
    cuda = torch.device("cuda")
    for capability, dtype, why in ((None, torch.bfloat16, "found no CUDA device"), ((8, 0), torch.bfloat16, "(8, 0)"),
                                   ((12, 0), torch.bfloat16, "(12, 0)"), ((9, 0), torch.float32, "only bfloat16")):
        monkeypatch.setattr(grouped_mm, "_cuda_capability", lambda device, c=capability: c)
        assert why in (unsupported(cuda, dtype, D, INTER) or ""), (capability, dtype)
    # A torch whose op has no kernel here (2.8 had none for the CPU), and one without the op (before 2.8).
    def no_kernel(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError("Could not run 'aten::_grouped_mm' with arguments from the 'CPU' backend.\nmore")
    monkeypatch.setattr(torch, "_grouped_mm", no_kernel)
    with pytest.raises(ValueError, match=r"fails on cpu in torch.bfloat16 .*'CPU' backend\.; use grouped GEMM 'torch'"):
        gemm.prepare(*_weights(torch.bfloat16))
    monkeypatch.delattr(torch, "_grouped_mm")
    with pytest.raises(RuntimeError, match=r"needs torch._grouped_mm \(torch >= 2.8\).*; use grouped GEMM 'torch'"):
        make_grouped_gemm("grouped_mm")
