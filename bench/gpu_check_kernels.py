"""Steps 4-7 of the GPU check (bench/gpu_check.py): torch._grouped_mm and DeepGEMM against plain torch at
DeepSeek-V3's expert sizes, one MoE layer against the GPU's matmul peak, and the decode speed of a v3-layer
checkpoint."""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moemesh.bench.gpu_check_base import (
    Context,
    Outcome,
    Skip,
    judged,
    step_device,
    tflops,
)
from moemesh.bench.timing import mean_time_ms

if TYPE_CHECKING:
    import torch

# DeepSeek-V3's routed expert: hidden D, intermediate I; 32 slots: one rank's share of 256 experts over EP 8.
V3_HIDDEN, V3_INTER, V3_SLOTS = 7168, 2048, 32
GROUPED_ROWS = 8192  # rows over the 32 slots in grouped-gemm: a prefill chunk's worth
DEEPGEMM_ROWS = 4096  # fewer for deepgemm: its float32 FP8 reference is slow
# grouped_mm against torch in bf16: max |diff| / max |ref|, a few bf16 units in the last place (as
# tests/unit/ep/test_grouped_mm_gemm.py): both sum in float32, only the order and h's rounding differ.
GROUPED_TOL = 2.0 ** -6
MATMUL_PEAK_N = 8192  # the square bf16 torch.mm that measures the GPU's matmul peak
EP_RANKS, LAYER_TOKENS = 8, 4096  # moe-layer-tflops: 4096 tokens on each of 8 ranks, this rank's 32 experts
DECODE_BATCH, DECODE_PROMPT, DECODE_TOKENS = 32, 64, 64  # v3-layer-decode

# ---- step 4: torch._grouped_mm against plain torch, bf16 at V3 expert dims -----------------------------------------

def skewed_counts(slots: int, rows: int, seed: int = 0) -> list[int]:
    """`rows` split over `slots` as routed traffic is: Zipf-like shares in a seeded order, one slot empty, and
    counts of any size (so the kernels' ragged edges run)."""
    shares = [1.0 / (k + 1) ** 0.8 for k in range(slots - 1)] + [0.0]
    random.Random(seed).shuffle(shares)
    counts = [int(rows * s / sum(shares)) for s in shares]
    counts[counts.index(max(counts))] += rows - sum(counts)
    return counts


def expert_weights(slots: int, hidden: int, inter: int, device: torch.device, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [S, 2I, D], w2 [S, D, I] bf16, scaled by 1/sqrt(fan-in) so activations stay O(1)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.randn(slots, 2 * inter, hidden, device=device, dtype=torch.bfloat16, generator=gen)
    w2 = torch.randn(slots, hidden, inter, device=device, dtype=torch.bfloat16, generator=gen)
    return w13.mul_(hidden ** -0.5), w2.mul_(inter ** -0.5)


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float32."""
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30)).item()


def grouped_gemm_case(device: torch.device, hidden: int, inter: int, counts: list[int], seed: int = 0,
                      iters: int = 10) -> dict[str, Any]:
    """TorchGroupedMmGemm against TorchGroupedGemm in bf16 on rows grouped by `counts`: max error relative to the
    output's scale in both layouts, and each backend's contiguous time and TFLOP/s."""
    import torch

    from moemesh.bench.ep_hopper_moe import masked_of
    from moemesh.ep.experts import TorchGroupedGemm
    from moemesh.ep.grouped_mm import TorchGroupedMmGemm

    w13, w2 = expert_weights(len(counts), hidden, inter, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    xs = torch.randn(sum(counts), hidden, device=device, dtype=torch.bfloat16, generator=gen)
    plain, grouped = TorchGroupedGemm(), TorchGroupedMmGemm()
    weights = grouped.prepare(w13, w2)
    xm, counts_t, valid = masked_of(xs, counts)
    errors = {"contiguous": max_rel_error(grouped.contiguous(xs, counts, weights),
                                          plain.contiguous(xs, counts, (w13, w2))),
              "masked": max_rel_error(grouped.masked(xm, counts_t, weights)[valid],
                                      plain.masked(xm, counts_t, (w13, w2))[valid])}
    flop = 2 * sum(counts) * 3 * hidden * inter
    ms = {"grouped_mm": mean_time_ms(lambda: grouped.contiguous(xs, counts, weights), device, iters=iters),
          "torch": mean_time_ms(lambda: plain.contiguous(xs, counts, (w13, w2)), device, iters=iters)}
    return {"rows": sum(counts), "slots": len(counts), "hidden": hidden, "inter": inter, "counts": counts,
            "max_rel_error": errors, "tolerance": GROUPED_TOL, "ms": ms,
            "tflops": {k: tflops(flop, v) for k, v in ms.items()}}


def step_grouped_gemm(ctx: Context) -> Outcome:
    """TorchGroupedMmGemm (torch._grouped_mm) against TorchGroupedGemm in bf16 at DeepSeek-V3's expert dims, 32 slots,
    skewed counts. PASS: max |diff| <= 2^-6 x max |output| in both layouts; the TFLOP/s are measurements."""
    import torch

    from moemesh.ep.grouped_mm import unsupported

    device = step_device(ctx, gpu_only=True)
    why = unsupported(device, torch.bfloat16, V3_HIDDEN, V3_INTER)
    if why:
        raise Skip(f"torch._grouped_mm {why}")
    r = grouped_gemm_case(device, V3_HIDDEN, V3_INTER, skewed_counts(V3_SLOTS, GROUPED_ROWS))
    err = max(e if math.isfinite(e) else math.inf for e in r["max_rel_error"].values())  # NaN: a FAIL
    return judged(err <= GROUPED_TOL,
                  f"max err {err:.1e} of the output's scale (tol {GROUPED_TOL:.1e}); grouped_mm "
                  f"{r['tflops']['grouped_mm']:.0f} TFLOP/s, torch {r['tflops']['torch']:.0f} TFLOP/s "
                  f"({r['rows']} rows over {V3_SLOTS} slots, D={V3_HIDDEN}, I={V3_INTER}, bf16)", r)


# ---- step 5: DeepGEMM's FP8 grouped GEMMs ----------------------------------------------------------------------------

def deepgemm_case(gemm: Any, device: torch.device, hidden: int, inter: int, counts: list[int], seed: int = 0
                  ) -> dict[str, Any]:
    """A DeepGemmGroupedGemm in both layouts against the FP8 reference (the same quantized operands multiplied in
    float32 by plain torch) and against TorchGroupedGemm in bf16; normwise and max relative errors."""
    import torch

    from moemesh.bench.ep_hopper_moe import TOL_VS_BF16, TOL_VS_FP8_REFERENCE, masked_of, rel_errors
    from moemesh.ep.deepgemm import DeepGemmGroupedGemm
    from moemesh.ep.experts import TorchGroupedGemm

    w13, w2 = expert_weights(len(counts), hidden, inter, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    xs = torch.randn(sum(counts), hidden, device=device, dtype=torch.bfloat16, generator=gen)
    weights = gemm.prepare(w13, w2)
    fp8_ref, bf16 = DeepGemmGroupedGemm.emulated(pow2_scales=gemm.pow2_scales), TorchGroupedGemm()
    xm, counts_t, valid = masked_of(xs, counts)
    layouts: dict[str, Callable[[Any, Any], torch.Tensor]] = {
        "contiguous": lambda g, w: g.contiguous(xs, counts, w),
        "masked": lambda g, w: g.masked(xm, counts_t, w)[valid],
    }
    out: dict[str, Any] = {"rows": sum(counts), "slots": len(counts), "hidden": hidden, "inter": inter,
                           "tolerance": {"vs_fp8_reference": TOL_VS_FP8_REFERENCE, "vs_bf16": TOL_VS_BF16}}
    ok = True
    for name, run in layouts.items():
        got = run(gemm, weights)
        vs_fp8 = rel_errors(got, run(fp8_ref, weights))  # the same quantized weights: only the kernels differ
        vs_bf16 = rel_errors(got, run(bf16, (w13, w2)))
        ok &= vs_fp8[0] < TOL_VS_FP8_REFERENCE and vs_bf16[0] < TOL_VS_BF16
        out[name] = {"vs_fp8_reference": {"norm": vs_fp8[0], "max": vs_fp8[1]},
                     "vs_bf16": {"norm": vs_bf16[0], "max": vs_bf16[1]}}
    out["ok"] = ok
    # After the checks: DeepGEMM compiles each shape on its first call, outside the timing.
    ms = mean_time_ms(lambda: gemm.contiguous(xs, counts, weights), device)
    out.update(ms=ms, tflops=tflops(2 * sum(counts) * 3 * hidden * inter, ms))
    return out


def step_deepgemm(ctx: Context) -> Outcome:
    """DeepGemmGroupedGemm, contiguous and masked, at V3 expert dims over 32 slots against the FP8 reference and
    TorchGroupedGemm bf16. PASS: normwise relative error < 3e-2 against the FP8 reference and < 0.1 against bf16
    (FP8's own error; the CPU tests' and bench/ep_hopper_moe.py's tolerances), both layouts."""
    try:
        importlib.import_module("deep_gemm")
    except Exception as e:  # a broken build raises more than ImportError
        raise Skip(f"deep_gemm is not importable: {type(e).__name__}: {e}") from None
    device = step_device(ctx, gpu_only=True)
    from moemesh.ep.deepgemm import DeepGemmGroupedGemm

    gemm = DeepGemmGroupedGemm()  # deep_gemm imports but cannot serve here: a FAIL, with its reason
    r = deepgemm_case(gemm, device, V3_HIDDEN, V3_INTER, skewed_counts(V3_SLOTS, DEEPGEMM_ROWS))
    parts = [f"{k} {r[k]['vs_fp8_reference']['norm']:.1e} vs fp8 ref, {r[k]['vs_bf16']['norm']:.1e} vs bf16"
             for k in ("contiguous", "masked")]
    return judged(r["ok"], f"normwise rel err: {'; '.join(parts)} (tol {r['tolerance']['vs_fp8_reference']:.0e}, "
                           f"{r['tolerance']['vs_bf16']:.0e}); contiguous end to end {r['tflops']:.0f} TFLOP/s "
                           f"({r['rows']} rows over {V3_SLOTS} slots, D={V3_HIDDEN}, I={V3_INTER}, fp8)", r)


# ---- step 6: one MoE layer's routed experts against the GPU's matmul peak -------------------------------------------

def layer_counts(device: torch.device, local_experts: int, ranks: int, tokens_per_rank: int, shape: Any = None,
                 seed: int = 0) -> list[int]:
    """The rows EP rank 0 receives for its `local_experts` experts when each of `ranks` ranks routes
    `tokens_per_rank` tokens as DeepSeek-V3 routes (bench/ep_hopper_moe.py's `route`: sigmoid scores, top-4 of 8
    groups, top-8 experts, a per-expert bias for an uneven load)."""
    import torch

    from moemesh.bench.ep_hopper_moe import DEEPSEEK_V3, route

    shape = shape or DEEPSEEK_V3
    ids = route(shape, ranks * tokens_per_rank, device, torch.Generator(device=device).manual_seed(seed))
    return torch.bincount(ids.reshape(-1), minlength=shape.experts)[:local_experts].tolist()


def matmul_peak_tflops(device: torch.device, n: int = MATMUL_PEAK_N, iters: int = 20) -> float:
    """TFLOP/s of a square bf16 torch.mm of side `n`: this GPU's practical matmul peak, measured, not from a
    datasheet."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    return tflops(2 * n ** 3, mean_time_ms(lambda: torch.mm(a, b, out=out), device, warmup=3, iters=iters))


def moe_layer_case(device: torch.device, counts: list[int], hidden: int, inter: int, peak_n: int = MATMUL_PEAK_N,
                   iters: int = 10) -> dict[str, Any]:
    """The routed experts of one layer on one rank (rows grouped by `counts`) through every bf16 grouped GEMM that
    runs here, timed, and the best as a fraction of the measured matmul peak."""
    import torch

    from moemesh.ep.experts import TorchGroupedGemm
    from moemesh.ep.grouped_mm import TorchGroupedMmGemm, unsupported

    w13, w2 = expert_weights(len(counts), hidden, inter, device)
    xs = torch.randn(sum(counts), hidden, device=device, dtype=torch.bfloat16,
                     generator=torch.Generator(device=device).manual_seed(1))
    backends: dict[str, tuple[Any, Any]] = {"torch": (TorchGroupedGemm(), (w13, w2))}
    if unsupported(device, torch.bfloat16, hidden, inter) is None:
        grouped = TorchGroupedMmGemm()
        backends["grouped_mm"] = (grouped, grouped.prepare(w13, w2))
    flop = 2 * sum(counts) * 3 * hidden * inter
    rates, finite = {}, True
    for name, (gemm, weights) in backends.items():
        finite &= bool(torch.isfinite(gemm.contiguous(xs, counts, weights)).all())
        rates[name] = tflops(flop, mean_time_ms(lambda g=gemm, w=weights: g.contiguous(xs, counts, w), device,
                                           iters=iters))
    peak = matmul_peak_tflops(device, peak_n)
    best = max(rates, key=rates.__getitem__)
    return {"rows": sum(counts), "slots": len(counts), "max_rows": max(counts), "min_rows": min(counts),
            "hidden": hidden, "inter": inter, "tflop": flop / 1e12, "tflops": rates, "best": best,
            "matmul_peak_tflops": peak, "matmul_peak_n": peak_n, "fraction_of_peak": rates[best] / peak,
            "finite": finite}


def step_moe_layer_tflops(ctx: Context) -> Outcome:
    """One DeepSeek-V3 MoE layer's routed-expert GEMMs on one rank of EP 8 (32 local experts; 4096 tokens on each
    rank, top-8 of 256 experts as V3 routes), bf16, in TFLOP/s against a bf16 torch.mm of side 8192 timed with CUDA
    events. PASS: the outputs are finite and the fraction of peak is in (0, 1.2] (above: the peak is mismeasured)."""
    device = step_device(ctx, gpu_only=True)
    r = moe_layer_case(device, layer_counts(device, V3_SLOTS, EP_RANKS, LAYER_TOKENS), V3_HIDDEN, V3_INTER)
    frac = r["fraction_of_peak"]
    rates = [f"{k} {v:.0f}" for k, v in r["tflops"].items()]
    return judged(r["finite"] and 0 < frac <= 1.2,
                  f"{frac:.2f} of peak: {r['best']} {r['tflops'][r['best']]:.0f} TFLOP/s against bf16 mm "
                  f"{r['matmul_peak_tflops']:.0f} TFLOP/s ({', '.join(rates)}; {r['rows']} rows over {V3_SLOTS} "
                  f"experts, {r['min_rows']} to {r['max_rows']} each; rule: finite, fraction in (0, 1.2])", r)


# ---- step 7: decode speed of a v3-layer checkpoint ------------------------------------------------------------------

def decode_rate(model_dir: Path, device: str, batch: int = DECODE_BATCH, prompt_len: int = DECODE_PROMPT,
                new_tokens: int = DECODE_TOKENS) -> dict[str, Any]:
    """Greedy decode tokens per second of `batch` random prompts in the engine: the time of `new_tokens` tokens
    less the time of one (the prefill and the first token), over the `new_tokens - 1` decode steps."""
    import torch

    from moemesh.engine.engine import Engine, EngineConfig
    from moemesh.engine.sampling_params import SamplingParams
    from moemesh.model.config import ModelConfig

    vocab = ModelConfig.from_dir(model_dir).vocab_size
    # Prefix caching off: the second run must not find the first one's prompts cached.
    engine = Engine(EngineConfig(model=str(model_dir), device=device, enable_prefix_caching=False,
                                 max_num_seqs=max(64, batch), max_num_batched_tokens=max(2048, batch * prompt_len)))
    # Ids from 8 up: the special tokens live below, and EOS would end a run early.
    prompts = torch.randint(8, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).tolist()

    def timed(n: int) -> tuple[float, list[Any]]:
        t0 = time.perf_counter()
        outs = engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        return time.perf_counter() - t0, outs  # generate returns token lists: the device is done

    engine.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))  # warm-up
    first_s, _ = timed(1)
    all_s, outs = timed(new_tokens)
    decode_s = max(all_s - first_s, 1e-9)
    return {"model": str(model_dir), "device": device, "dtype": str(next(engine.model.parameters()).dtype),
            "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "complete": all(len(o.token_ids) == new_tokens for o in outs), "prefill_and_first_token_s": first_s,
            "decode_step_ms": decode_s / (new_tokens - 1) * 1e3, "decode_tok_s": batch * (new_tokens - 1) / decode_s}


def _no_v3_layer_dir() -> str:
    from moemesh.model.tiny import PRESETS

    how = ("write one with `moemesh make-tiny DIR --preset v3-layer --dtype bfloat16`" if "v3-layer" in PRESETS
           else "the `moemesh make-tiny --preset v3-layer` preset does not exist yet")
    return f"V3_LAYER_DIR is not set: point it at a v3-layer checkpoint folder ({how})"


def step_v3_layer_decode(ctx: Context) -> Outcome:
    """Decode tok/s of the v3-layer checkpoint in $V3_LAYER_DIR on one GPU, greedy, batch 32, 64-token prompts,
    64 new tokens, the checkpoint's dtype. SKIP without V3_LAYER_DIR. PASS: every request got its 64 tokens (the
    rate is a measurement)."""
    folder = os.environ.get("V3_LAYER_DIR")
    if not folder:
        raise Skip(_no_v3_layer_dir())
    if not (Path(folder) / "config.json").is_file():
        raise RuntimeError(f"V3_LAYER_DIR={folder} has no config.json")
    step_device(ctx)
    r = decode_rate(Path(folder), ctx.device)
    return judged(r["complete"], f"{r['decode_tok_s']:.0f} tok/s decode ({r['decode_step_ms']:.2f} ms per step at "
                                 f"batch {r['batch']}, {r['dtype']}, {Path(folder).name}; rule: every request "
                                 f"got its {r['new_tokens']} tokens)", r)

