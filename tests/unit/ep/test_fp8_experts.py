"""Routed experts kept in FP8 (one 8-bit copy with block scales), converted one expert at a time when computed:
the same numbers as converting them at load, in the single-process model and through EP's grouped GEMM in both
layouts; backends that cannot take them say so at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moemesh.ep.experts import EPExperts, make_grouped_gemm
from moemesh.ep.placement import ExpertPlacement
from moemesh.model.deepseek import DeepseekForCausalLM
from moemesh.model.fp8 import Fp8Experts, quantize_blocks
from moemesh.model.loader import load_model
from moemesh.model.moe import MoE
from tests.fp8_checkpoint import write_fp8_checkpoint
from tests.unit.ep.test_grouped_mm_gemm import MaskedLoopback
from tests.unit.ep.test_tbo_stages import TOL, LoopbackDispatcher, max_diff, plain_logits


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fp8_checkpoint(tmp_path_factory.mktemp("fp8"))[0]


def _ep(model: DeepseekForCausalLM, dispatcher: type[LoopbackDispatcher], gemm: str = "torch") -> list[EPExperts]:
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    placement = ExpertPlacement.default(len(moes), 8, 1, redundant=2)
    disp = dispatcher(placement)
    for layer, moe in enumerate(moes):
        moe.experts = EPExperts(moe.experts, layer, placement, disp, gemm)
    return [m.experts for m in moes]


def test_fp8_experts_compute_what_experts_converted_at_load_compute(fp8_dir: Path) -> None:
    kept, converted = load_model(fp8_dir, "float32"), load_model(fp8_dir, "float32", fp8_experts=False)
    experts = kept.model.layers[1].mlp.experts
    assert experts.w13.dtype == torch.float8_e4m3fn and experts.w2.dtype == torch.float8_e4m3fn
    assert experts.w13_scale_inv.shape == (8, 2, 1, 2) and experts.w2_scale_inv.shape == (8, 2, 1)
    # The same expert matrices; the converted ones may take the batched-matmul form, which sums in another order.
    assert max_diff(plain_logits(kept), plain_logits(converted)) <= TOL


@pytest.mark.parametrize("dispatcher", [LoopbackDispatcher, MaskedLoopback], ids=["contiguous", "masked"])
def test_ep_keeps_them_in_8_bits_and_computes_the_same(fp8_dir: Path, dispatcher: type[LoopbackDispatcher]) -> None:
    kept, converted = load_model(fp8_dir, "float32"), load_model(fp8_dir, "float32", fp8_experts=False)
    mine, plain = _ep(kept, dispatcher), _ep(converted, dispatcher)
    assert mine[0].w13.dtype == torch.float8_e4m3fn and mine[0].w13_scale_inv.shape == (10, 2, 1, 2)
    held = sum(t.numel() * t.element_size() for t in [*mine[0].parameters(), *mine[0].buffers()])
    assert held < 1.05 * (mine[0].w13.numel() + mine[0].w2.numel())  # a byte per weight, the scales, no 2nd copy
    assert plain[0].w13.dtype == torch.float32
    assert max_diff(plain_logits(kept), plain_logits(converted)) <= TOL


def test_slot_tensors_carry_the_scales(fp8_dir: Path) -> None:
    experts = _ep(load_model(fp8_dir, "float32"), LoopbackDispatcher)[0]
    tensors = experts.slot_tensors()
    assert [t.dtype for t in tensors] == [torch.float8_e4m3fn, torch.float8_e4m3fn, torch.float32, torch.float32]
    assert all(t.shape[0] == 10 for t in tensors)
    swapped = [t.flip(0) for t in tensors]  # every slot's expert, in reverse
    experts.set_weights(experts.placement, *swapped)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
               for a, b in zip(experts.slot_tensors(), swapped, strict=True))
    with pytest.raises(ValueError, match="do not fit"):
        experts.set_weights(experts.placement, *swapped[:2])


@pytest.mark.parametrize("gemm", ["onednn", "grouped_mm"])
def test_backends_without_fp8_say_so_at_start_up(fp8_dir: Path, gemm: str) -> None:
    try:
        make_grouped_gemm(gemm)
    except RuntimeError as e:  # this machine cannot run the backend at all
        pytest.skip(str(e))
    with pytest.raises(ValueError, match=r"does not take FP8 experts.*'torch'"):
        _ep(load_model(fp8_dir, "bfloat16"), LoopbackDispatcher, gemm)


def _fp8_experts(s: int, d: int, inter: int, seed: int = 0) -> Fp8Experts:
    g = torch.Generator().manual_seed(seed)
    w13, w13_s, w2, w2_s = [], [], [], []
    for _ in range(s):
        halves = [quantize_blocks(torch.randn(inter, d, generator=g) * 0.05, (128, 128)) for _ in range(2)]
        w13.append(torch.cat([h[0] for h in halves]))
        w13_s.append(torch.stack([h[1] for h in halves]))
        q, sc = quantize_blocks(torch.randn(d, inter, generator=g) * 0.05, (128, 128))
        w2.append(q)
        w2_s.append(sc)
    return Fp8Experts(torch.stack(w13), torch.stack(w2), torch.stack(w13_s), torch.stack(w2_s), (128, 128))


@pytest.mark.parametrize("pow2", [False, True], ids=["hopper", "blackwell"])
def test_deepgemm_consumes_fp8_experts_without_a_second_copy(pow2: bool) -> None:
    """DeepGEMM's kernels (emulated here as they compute) take the checkpoint's e4m3 blocks as they are; on
    Blackwell, whose kernels want power-of-two scales, the blocks are re-expressed in place."""
    from moemesh.ep.deepgemm import DeepGemmGroupedGemm
    from moemesh.ep.experts import TorchGroupedGemm

    experts = _fp8_experts(3, 256, 128)
    before = [t.clone() for t in (experts.w13, experts.w2)]
    reference = Fp8Experts(*(t.clone() for t in (experts.w13, experts.w2, experts.w13_scale, experts.w2_scale)),
                           experts.block)
    gemm = DeepGemmGroupedGemm.emulated(pow2_scales=pow2)
    weights = gemm.prepare_fp8(experts)
    assert weights.w13[0].data_ptr() == experts.w13.data_ptr() and weights.w2[0].data_ptr() == experts.w2.data_ptr()
    assert weights.w13[1].shape == (3, 2, 2) and weights.w2[1].shape == (3, 2, 1)
    unchanged = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                    for a, b in zip((experts.w13, experts.w2), before, strict=True))
    assert unchanged != pow2
    if pow2:
        for sf in (weights.w13[1], weights.w2[1]):
            assert torch.equal(torch.exp2(torch.log2(sf).round()), sf)
    xs = torch.randn(9, 256).bfloat16()
    counts = [4, 0, 5]
    want = TorchGroupedGemm().contiguous(xs, counts, reference).float()
    got = gemm.contiguous(xs, counts, weights).float()
    # The activations' own FP8 rounding; on Blackwell also the weights' second rounding, onto power-of-two scales
    # (the bound the fresh-quantization tests in test_ep_gpu_backends.py use).
    assert (got - want).norm() / want.norm() < (0.1 if pow2 else 0.05)


def test_deepgemm_refuses_fp8_experts_its_kernels_cannot_take(fp8_dir: Path) -> None:
    from moemesh.ep.deepgemm import DeepGemmGroupedGemm

    experts = load_model(fp8_dir, "bfloat16").model.layers[1].mlp.experts.fp8()  # hidden 192
    with pytest.raises(ValueError, match="hidden D to be a multiple of 128"):
        DeepGemmGroupedGemm.emulated().prepare_fp8(experts)
