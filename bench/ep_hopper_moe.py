"""One MoE layer's routed-expert compute on one Hopper GPU: DeepGEMM's FP8 grouped GEMMs against plain torch bf16.

(a) Checks the `deepgemm` grouped-GEMM backend, contiguous and masked layouts, on a small case and a DeepSeek-V3-sized
    one: against the FP8 reference (the same quantized operands multiplied in float32 by plain torch: this catches
    layout and scale bugs) and against the `torch` backend in bf16 (this is the FP8 error itself).
(b) Times one layer's expert compute at DeepSeek-V3's shape (hidden 7168, 256 routed experts, top-8, expert
    intermediate 2048) for --tokens tokens routed as DeepSeek-V3 routes (8 groups, top-4 groups, top-8 experts),
    after the backend's start-up warm-up (`DeepGemmGroupedGemm.warm_up`, whose time it prints: DeepGEMM's JIT).

Without CUDA, a Hopper GPU or deep_gemm it prints one line "skipped: <reason>" and exits 0. A failed check exits 1.
Usage, from the repository root: python bench/ep_hopper_moe.py [--tokens 4096] [--skip-check]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moemesh.bench.timing import mean_time_ms  # noqa: E402
from moemesh.ep.deepgemm import (  # noqa: E402
    DeepGemmGroupedGemm,
    DeepGemmWeights,
    contiguous_layout,
    contiguous_rungs,
    quantize_rows,
)
from moemesh.ep.experts import GroupedGemm, TorchGroupedGemm  # noqa: E402
from moemesh.model.layers import silu_and_mul  # noqa: E402

# Normwise relative errors. Against the FP8 reference only accumulation order differs (and the few activations
# that then round to a neighbouring e4m3 value); a wrong layout or scale gives errors of order 1. Against bf16, one
# e4m3 GEMM is ~3.7% off on Gaussian data (e4m3 keeps 3 mantissa bits) and the two-GEMM SwiGLU chain ~6.5%.
TOL_VS_FP8_REFERENCE = 3e-2
TOL_VS_BF16 = 0.1


@dataclass(frozen=True)
class Shape:
    """One MoE layer: E experts (all local: one GPU), D hidden, I expert intermediate, top-K of G groups."""

    name: str
    experts: int
    hidden: int
    inter: int
    topk: int
    groups: int
    topk_groups: int


# Hidden 2048: the smallest DeepEP's low-latency kernels are compiled for, so the masked layout is checked at a shape
# decode can hand it (deepep.LOW_LATENCY_HIDDEN).
SMALL = Shape("small", experts=8, hidden=2048, inter=256, topk=4, groups=4, topk_groups=2)
DEEPSEEK_V3 = Shape("DeepSeek-V3", experts=256, hidden=7168, inter=2048, topk=8, groups=8, topk_groups=4)


def skip_reason() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        DeepGemmGroupedGemm()
    except RuntimeError as e:
        return str(e)
    return None


def make_weights(shape: Shape, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [E, 2I, D], w2 [E, D, I] bf16, scaled by 1/sqrt(fan-in) so activations stay O(1)."""
    w13 = torch.randn(shape.experts, 2 * shape.inter, shape.hidden, device=device, dtype=torch.bfloat16,
                      generator=gen)
    w13.mul_(shape.hidden ** -0.5)
    w2 = torch.randn(shape.experts, shape.hidden, shape.inter, device=device, dtype=torch.bfloat16, generator=gen)
    w2.mul_(shape.inter ** -0.5)
    return w13, w2


def route(shape: Shape, tokens: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """[T, K] int64 experts chosen as DeepSeek-V3 chooses (sigmoid scores, top groups by their top-2 sum, top-K
    within them); a fixed per-expert bias makes the load uneven, as real traffic is."""
    e, g = shape.experts, shape.groups
    bias = torch.randn(e, device=device, generator=gen) * 0.5
    scores = torch.sigmoid(torch.randn(tokens, e, device=device, generator=gen) + bias)
    group_scores = scores.view(tokens, g, e // g).topk(min(2, e // g), dim=-1).values.sum(dim=-1)
    top_groups = group_scores.topk(shape.topk_groups, dim=-1).indices
    keep = torch.zeros(tokens, g, dtype=torch.bool, device=device).scatter_(1, top_groups, True)
    masked = scores.masked_fill(~keep.repeat_interleave(e // g, dim=1), float("-inf"))
    return masked.topk(shape.topk, dim=-1).indices


def pairs_by_expert(x: torch.Tensor, ids: torch.Tensor, experts: int) -> tuple[torch.Tensor, list[int]]:
    """x [T, D], ids [T, K] -> (xs [T*K, D] one row per (token, expert), sorted by expert; counts [E])."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    xs = x.index_select(0, torch.div(order, ids.shape[1], rounding_mode="floor"))
    return xs, torch.bincount(flat, minlength=experts).tolist()


def masked_of(xs: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous rows -> the masked layout: (xm [E, C, D] with C = max count, counts [E] int64, valid [E, C] bool)."""
    e, c = len(counts), max(max(counts), 1)
    counts_t = torch.tensor(counts, dtype=torch.int64, device=xs.device)
    valid = torch.arange(c, device=xs.device).unsqueeze(0) < counts_t.unsqueeze(1)
    xm = xs.new_zeros(e, c, xs.shape[1])
    xm[valid] = xs
    return xm, counts_t, valid


def rel_errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(||out - ref|| / ||ref||, max |out - ref| / max |ref|), in float32."""
    diff = out.float() - ref.float()
    ref_f = ref.float()
    return (diff.norm() / ref_f.norm().clamp(min=1e-30)).item(), (diff.abs().max() / ref_f.abs().max()).item()


def check(shape: Shape, gemm: DeepGemmGroupedGemm, w13: torch.Tensor, w2: torch.Tensor, weights: DeepGemmWeights,
          tokens: int, gen: torch.Generator) -> bool:
    """Both layouts of `gemm` against the FP8 reference and against torch bf16; prints one line per layout."""
    device = w13.device
    x = torch.randn(tokens, shape.hidden, device=device, dtype=torch.bfloat16, generator=gen)
    xs, counts = pairs_by_expert(x, route(shape, tokens, device, gen), shape.experts)
    bf16, fp8_ref = TorchGroupedGemm(), DeepGemmGroupedGemm.emulated(pow2_scales=gemm.pow2_scales)
    xm, counts_t, valid = masked_of(xs, counts)
    runs: list[tuple[str, Callable[[GroupedGemm, object], torch.Tensor]]] = [
        ("contiguous", lambda g, w: g.contiguous(xs, counts, w)),
        ("masked", lambda g, w: g.masked(xm, counts_t, w)[valid]),
    ]
    ok = True
    for layout, run in runs:
        out = run(gemm, weights)
        vs_fp8 = rel_errors(out, run(fp8_ref, weights))  # the same quantized weights: only the kernels differ
        vs_bf16 = rel_errors(out, run(bf16, (w13, w2)))
        passed = vs_fp8[0] < TOL_VS_FP8_REFERENCE and vs_bf16[0] < TOL_VS_BF16
        ok &= passed
        print(f"check {shape.name} {layout:10s} ({len(xs)} pairs over {shape.experts} experts, D={shape.hidden}, "
              f"I={shape.inter}): rel err vs fp8 reference {vs_fp8[0]:.2e} (max {vs_fp8[1]:.2e}, tol "
              f"{TOL_VS_FP8_REFERENCE:.0e}), vs torch bf16 {vs_bf16[0]:.2e} (max {vs_bf16[1]:.2e}, tol "
              f"{TOL_VS_BF16:.0e}): {'ok' if passed else 'FAILED'}", flush=True)
    return ok


def bench(shape: Shape, gemm: DeepGemmGroupedGemm, w13: torch.Tensor, w2: torch.Tensor, weights: DeepGemmWeights,
          tokens: int, gen: torch.Generator) -> None:
    """Time one layer's expert compute for `tokens` tokens: torch bf16, DeepGEMM end to end, DeepGEMM GEMMs alone."""
    device = w13.device
    x = torch.randn(tokens, shape.hidden, device=device, dtype=torch.bfloat16, generator=gen)
    xs, counts = pairs_by_expert(x, route(shape, tokens, device, gen), shape.experts)
    flop = 2 * tokens * shape.topk * 3 * shape.hidden * shape.inter
    alignment = int(gemm.api.alignment())
    layout = contiguous_layout(counts, alignment, device)
    # As serving does at start-up (EPGroup.apply): DeepGEMM compiles each new kernel here, not in the timed calls.
    start = time.perf_counter()
    calls = gemm.warm_up(weights, contiguous_rows=len(xs))
    rungs = contiguous_rungs(len(xs), alignment, shape.experts)
    print(f"warm-up: {calls} layer calls at M = {rungs[0]} .. {rungs[-1]} in {time.perf_counter() - start:.1f} s",
          flush=True)
    print(f"time {shape.name} layer: {tokens} tokens x top-{shape.topk} over {shape.experts} experts "
          f"(max {max(counts)}, min {min(counts)} rows per expert; {layout.num_rows} rows once padded for "
          f"DeepGEMM), D={shape.hidden}, I={shape.inter}: {flop / 1e12:.3f} TFLOP per layer", flush=True)

    # The kernels alone: the padded layout and its FP8 activations made once, outside the timing.
    a = xs.new_zeros(layout.num_rows, shape.hidden).index_copy_(0, layout.rows, xs)
    lhs13 = quantize_rows(a)
    h = torch.empty(layout.num_rows, 2 * shape.inter, device=device, dtype=torch.bfloat16)
    gemm.api.contiguous(lhs13, weights.w13, h, layout.m_indices)
    lhs2 = quantize_rows(silu_and_mul(h))
    out = torch.empty(layout.num_rows, shape.hidden, device=device, dtype=torch.bfloat16)

    def kernels_only() -> None:
        gemm.api.contiguous(lhs13, weights.w13, h, layout.m_indices)
        gemm.api.contiguous(lhs2, weights.w2, out, layout.m_indices)

    bf16 = TorchGroupedGemm()
    runs = [
        ("torch bf16, one matmul pair per expert", lambda: bf16.contiguous(xs, counts, (w13, w2))),
        ("deepgemm fp8, end to end (pad, quantize, 2 GEMMs, SwiGLU)", lambda: gemm.contiguous(xs, counts, weights)),
        ("deepgemm fp8, the 2 grouped GEMMs alone", kernels_only),
    ]
    for label, fn in runs:
        ms = mean_time_ms(fn, torch.device("cuda"), warmup=3)
        print(f"  {label:58s} {ms:8.3f} ms {flop / ms / 1e9:8.1f} TFLOP/s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the timed layer (default 4096)")
    parser.add_argument("--skip-check", action="store_true", help="time only, skip the correctness checks")
    args = parser.parse_args(argv)
    if args.tokens < 1:
        parser.error("--tokens must be >= 1")
    reason = skip_reason()
    if reason is not None:
        print(f"skipped: {reason}")
        return 0
    gemm = DeepGemmGroupedGemm()
    device = torch.device("cuda", torch.cuda.current_device())
    cap = torch.cuda.get_device_capability(device)
    print(f"device: {torch.cuda.get_device_name(device)} (sm{cap[0]}{cap[1]}), torch {torch.__version__}, "
          f"deep_gemm API: {', '.join(gemm.api.names)}", flush=True)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    ok = True
    if not args.skip_check:
        w13, w2 = make_weights(SMALL, device, gen)
        ok &= check(SMALL, gemm, w13, w2, gemm.prepare(w13, w2), 256, gen)
        del w13, w2
    # ~22.5 GB of bf16 weights plus ~11 GB in FP8: one H100/H200 holds them.
    w13, w2 = make_weights(DEEPSEEK_V3, device, gen)
    weights = gemm.prepare(w13, w2)
    if not args.skip_check:
        ok &= check(DEEPSEEK_V3, gemm, w13, w2, weights, 512, gen)
    bench(DEEPSEEK_V3, gemm, w13, w2, weights, args.tokens, gen)
    if not ok:
        print("FAILED: see the check lines above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
