"""DeepGEMM FP8 grouped GEMMs for the routed experts: the contiguous layout (prefill) and the masked one (decode).

Legend: S local slots (the groups), N rows received, M rows after padding every group to DeepGEMM's M alignment,
C rows per slot in the masked layout, D hidden, I expert intermediate size, G = ceil(K / 128) scale groups.

Numerics, as DeepSeek-V3 was trained and is served: weights in e4m3 with one float32 scale per 128x128 block,
activations in e4m3 with one float32 scale per 1x128 group of a row, bf16 outputs with float32 accumulation.
The quantizers below are plain torch (they run, and are tested, on the CPU); only the GEMMs need `deep_gemm`.

DeepGEMM's Python API was renamed in its 2.x refactor, and the masked GEMM once more within 2.x; every spelling is
accepted (positional arguments are the same in all: `(lhs, rhs, out, m_indices)` and
`(lhs, rhs, out, masked_m, expected_m)`):
- 1.x: `m_grouped_gemm_fp8_fp8_bf16_nt_contiguous`, `m_grouped_gemm_fp8_fp8_bf16_nt_masked`,
  `get_m_alignment_for_contiguous_layout`, `get_col_major_tma_aligned_tensor`;
- 2.0: `m_grouped_fp8_gemm_nt_contiguous`, `fp8_m_grouped_gemm_nt_masked`, `get_mk_alignment_for_contiguous_layout`,
  `get_mn_major_tma_aligned_tensor`;
- later 2.x: the masked one is `m_grouped_fp8_gemm_nt_masked` (`fp8_m_grouped_gemm_nt_masked` kept as an alias).

DeepGEMM JIT-compiles a kernel per shape and tiling the first time one is called, which can take a rank past
DeepEP's ~100 s receive timeout while its peers wait: `warm_up` runs the shapes serving will use at start-up.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from moemesh.ep.experts import GroupedGemm
from moemesh.model.fp8 import Fp8Experts
from moemesh.model.layers import silu_and_mul

BLOCK = 128  # the quantization granularity DeepGEMM's FP8 kernels are built for (1x128 and 128x128)
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# An all-zero group still needs a finite, nonzero scale (DeepGEMM's own casts clamp the same way).
_MIN_AMAX = 1e-4

# (what it is for, names newest first); the first present name is used.
_CONTIGUOUS = ("m_grouped_fp8_gemm_nt_contiguous", "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous")
_MASKED = ("m_grouped_fp8_gemm_nt_masked", "fp8_m_grouped_gemm_nt_masked", "m_grouped_gemm_fp8_fp8_bf16_nt_masked")
_ALIGNMENT = ("get_mk_alignment_for_contiguous_layout", "get_m_alignment_for_contiguous_layout")
_SCALE_LAYOUT = ("get_mn_major_tma_aligned_tensor", "get_col_major_tma_aligned_tensor")


# ---- quantization (plain torch) ------------------------------------------------------------------------------------

def _scale_of(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    scale = amax.clamp(min=_MIN_AMAX) / FP8_MAX
    # Blackwell kernels take power-of-two (UE8M0) scales; rounding up keeps |x / scale| <= 448 exactly.
    return torch.exp2(torch.ceil(torch.log2(scale))) if pow2 else scale


def quantize_rows(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row 1x128 FP8 quantization of activations.

    x [..., K] float -> (q [..., K] float8_e4m3fn, scales [..., G] float32), x ~= q * scales repeated per 128 columns.
    `pow2`: round every scale up to a power of two (what DeepGEMM's SM100 kernels want).
    """
    k = x.shape[-1]
    g = math.ceil(k / BLOCK)
    xf = x.float()
    if g * BLOCK != k:
        xf = torch.nn.functional.pad(xf, (0, g * BLOCK - k))
    xf = xf.reshape(*x.shape[:-1], g, BLOCK)
    scales = _scale_of(xf.abs().amax(dim=-1), pow2)
    q = (xf / scales.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(*x.shape[:-1], g * BLOCK)[..., :k].contiguous(), scales


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_rows`: q [..., K] fp8, scales [..., G] -> [..., K] float32."""
    k = q.shape[-1]
    return q.float() * scales.float().repeat_interleave(BLOCK, dim=-1)[..., :k]


def quantize_blocks(w: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 block FP8 quantization of weights.

    w [..., N, K] float -> (q [..., N, K] float8_e4m3fn, scales [..., ceil(N/128), ceil(K/128)] float32).
    """
    n, k = w.shape[-2:]
    nb, kb = math.ceil(n / BLOCK), math.ceil(k / BLOCK)
    wf = w.float()
    if (nb * BLOCK, kb * BLOCK) != (n, k):
        wf = torch.nn.functional.pad(wf, (0, kb * BLOCK - k, 0, nb * BLOCK - n))
    blocks = wf.reshape(*w.shape[:-2], nb, BLOCK, kb, BLOCK)
    scales = _scale_of(blocks.abs().amax(dim=(-3, -1)), pow2)  # [..., nb, kb]
    q = (blocks / scales[..., :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(*w.shape[:-2], nb * BLOCK, kb * BLOCK)[..., :n, :k].contiguous(), scales


def _to_pow2_scales(q: torch.Tensor, scales: torch.Tensor) -> None:
    """Re-express e4m3 blocks q [..., N, K] with scales [..., N/128, K/128] over power-of-two scales, in place."""
    q2, s2 = quantize_blocks(dequantize_blocks(q, scales), pow2=True)
    q.copy_(q2)
    scales.copy_(s2)


def dequantize_blocks(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_blocks`: q [..., N, K] fp8, scales [..., Nb, Kb] -> [..., N, K] float32."""
    n, k = q.shape[-2:]
    full = scales.float().repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)
    return q.float() * full[..., :n, :k]


# ---- the contiguous layout -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ContiguousLayout:
    """Where N rows sorted by group go when every group is padded to a multiple of the M alignment.

    rows [N] int64: the padded row of each input row.
    m_indices [M] int32: the group of each padded row, -1 for padding (DeepGEMM reads the group of an aligned
        block from its first row, which is always a real one, and skips blocks marked -1).
    """

    rows: torch.Tensor
    m_indices: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.m_indices.numel()


def contiguous_layout(counts: Sequence[int], alignment: int, device: torch.device | str | None = None
                      ) -> ContiguousLayout:
    """counts [S] rows per group (rows sorted by group) -> their padded layout; empty groups take no rows."""
    if alignment < 1:
        raise ValueError(f"alignment must be >= 1, got {alignment}")
    if any(c < 0 for c in counts):
        raise ValueError(f"counts must be >= 0, got {list(counts)}")
    padded = [-(-c // alignment) * alignment for c in counts]
    n, m = sum(counts), sum(padded)
    counts_t = torch.tensor(counts, dtype=torch.int64, device=device)
    padded_t = torch.tensor(padded, dtype=torch.int64, device=device)
    groups = torch.arange(len(counts), device=device)
    # output_size: no device sync for the length of the result.
    group_of_row = torch.repeat_interleave(groups, counts_t, output_size=n)
    shift = (torch.cumsum(padded_t, 0) - padded_t) - (torch.cumsum(counts_t, 0) - counts_t)  # [S]
    rows = torch.arange(n, device=device) + shift[group_of_row]
    m_indices = torch.full((m,), -1, dtype=torch.int32, device=device)
    m_indices[rows] = group_of_row.to(torch.int32)
    return ContiguousLayout(rows, m_indices)


# ---- the backend ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeepGemmApi:
    """The functions of the installed `deep_gemm` this backend calls, whatever their names in its version."""

    contiguous: Callable[..., Any]
    masked: Callable[..., Any]
    alignment: Callable[[], int]
    scale_layout: Callable[[torch.Tensor], torch.Tensor] | None  # LHS scales to the TMA-aligned MN-major layout
    names: tuple[str, ...]


def _find(module: ModuleType, names: Sequence[str]) -> tuple[str, Callable[..., Any]] | None:
    for name in names:
        for where in (module, getattr(module, "utils", None)):
            fn = getattr(where, name, None) if where is not None else None
            if callable(fn):
                return name, fn
    return None


def resolve_api(module: ModuleType) -> DeepGemmApi:
    """The grouped-GEMM API of `module` (1.x or 2.x names); RuntimeError naming what is missing."""
    found = {what: _find(module, names) for what, names in
             (("contiguous", _CONTIGUOUS), ("masked", _MASKED), ("alignment", _ALIGNMENT),
              ("scale_layout", _SCALE_LAYOUT))}
    missing = [" or ".join(names) for what, names in
               (("contiguous", _CONTIGUOUS), ("masked", _MASKED), ("alignment", _ALIGNMENT)) if found[what] is None]
    if missing:
        version = getattr(module, "__version__", "unknown version")
        raise RuntimeError(f"grouped GEMM 'deepgemm': the installed deep_gemm ({version}) lacks {'; '.join(missing)}; "
                           f"install DeepGEMM 1.x or 2.x built for this GPU, or use grouped GEMM 'torch'")
    scale = found["scale_layout"]
    return DeepGemmApi(found["contiguous"][1], found["masked"][1], found["alignment"][1],
                       scale[1] if scale else None,
                       tuple(hit[0] for hit in found.values() if hit is not None))


def _load_deep_gemm() -> ModuleType:
    try:
        return importlib.import_module("deep_gemm")
    except Exception as e:  # a broken build raises more than ImportError (missing .so symbols, CUDA init errors)
        raise RuntimeError(f"grouped GEMM 'deepgemm' needs the deep_gemm package (DeepGEMM built for this CUDA and "
                           f"torch), which cannot be imported: {type(e).__name__}: {e}; "
                           f"use grouped GEMM 'torch' instead") from e


def _cuda_capability() -> tuple[int, int] | None:
    """The current CUDA device's compute capability, None without CUDA (a seam for tests)."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()


@dataclass(frozen=True)
class DeepGemmWeights:
    """One layer's slots in DeepGEMM's form: (e4m3 [S, N, K], float32 128x128 block scales [S, N/128, K/128])."""

    w13: tuple[torch.Tensor, torch.Tensor]  # N = 2I, K = D
    w2: tuple[torch.Tensor, torch.Tensor]  # N = D, K = I


class DeepGemmGroupedGemm(GroupedGemm):
    """FP8 grouped GEMMs from DeepGEMM: weights quantized once in `prepare`, activations per call.

    `expected_m`: the masked kernels' hint of rows per slot; None derives it from the counts on every call
    (one device sync; pass a number for CUDA graphs).
    """

    def __init__(self, expected_m: int | None = None) -> None:
        module = _load_deep_gemm()
        capability = _cuda_capability()
        if capability is None or capability[0] < 9:
            found = "no CUDA device" if capability is None else f"a GPU of compute capability {capability}"
            raise RuntimeError(f"grouped GEMM 'deepgemm' needs deep_gemm on a Hopper (sm90) or newer GPU, found "
                               f"{found}; use grouped GEMM 'torch' instead")
        self.api = resolve_api(module)
        # Hopper takes float32 scales as they are; Blackwell casts them to UE8M0, exact only for powers of two.
        self.pow2_scales = capability[0] >= 10
        # On Hopper the kernels read LHS scales MN-major and TMA-aligned; laying them out here is what the library
        # would do inside the call. Newer GPUs get their own packed layout from the library, so leave them alone.
        self._scale_layout = self.api.scale_layout if capability[0] == 9 else None
        self.expected_m = expected_m
        self._warmed: set[tuple] = set()

    @classmethod
    def emulated(cls, pow2_scales: bool = False, expected_m: int | None = None) -> DeepGemmGroupedGemm:
        """The same backend over `emulated_api()`: what the kernels compute, in plain torch on any device."""
        self = cls.__new__(cls)
        self.api, self.pow2_scales, self._scale_layout, self.expected_m = emulated_api(), pow2_scales, None, expected_m
        self._warmed = set()
        return self

    def prepare(self, w13: torch.Tensor, w2: torch.Tensor) -> DeepGemmWeights:
        """w13 [S, 2I, D], w2 [S, D, I] (any float dtype) -> e4m3 weights with 128x128 block scales."""
        s, two_i, d = w13.shape
        if w2.shape != (s, d, two_i // 2):
            raise ValueError(f"w2 must be [S, D, I] = {[s, d, two_i // 2]}, got {list(w2.shape)}")
        if s == 0:
            raise ValueError("no local slots to prepare")
        for name, dim in (("hidden D", d), ("intermediate I", two_i // 2)):
            if dim % BLOCK:
                raise ValueError(f"DeepGEMM's FP8 kernels need {name} to be a multiple of {BLOCK}, got {dim}")
        # One slot at a time: a whole layer in float32 would be 4x its bf16 size (tens of GB for DeepSeek-V3).
        return DeepGemmWeights(self._blocks(w13), self._blocks(w2))

    def prepare_slots(self, weights: DeepGemmWeights, w13: torch.Tensor, w2: torch.Tensor,
                      slots: list[int]) -> DeepGemmWeights:
        """The slots a switch wrote quantized again into the layer's FP8 tensors, the others left as they are."""
        for (q, sf), w in ((weights.w13, w13), (weights.w2, w2)):
            for i in slots:
                q[i], sf[i] = quantize_blocks(w[i], self.pow2_scales)
        return weights

    def prepare_fp8(self, experts: Fp8Experts) -> DeepGemmWeights:
        """Experts kept in FP8 with the checkpoint's 128x128 block scales: consumed as they are (views, no second
        copy). Blackwell's kernels need power-of-two scales: each block is rescaled in place there, once."""
        s, two_i, d = experts.w13.shape
        if tuple(experts.block) != (BLOCK, BLOCK):
            raise ValueError(f"DeepGEMM's FP8 kernels take {BLOCK}x{BLOCK} block scales, the checkpoint has "
                             f"{experts.block[0]}x{experts.block[1]}; use grouped GEMM 'torch'")
        for name, dim in (("hidden D", d), ("intermediate I", two_i // 2)):
            if dim % BLOCK:
                raise ValueError(f"DeepGEMM's FP8 kernels need {name} to be a multiple of {BLOCK}, got {dim}")
        if self.pow2_scales:
            for i in range(s):
                _to_pow2_scales(experts.w13[i].view(2, two_i // 2, d), experts.w13_scale[i])
                _to_pow2_scales(experts.w2[i], experts.w2_scale[i])
        # Gate and up each have whole blocks (I % 128 == 0): their scale grids stack into w13's.
        w13_scale = experts.w13_scale.reshape(s, two_i // BLOCK, d // BLOCK)
        return DeepGemmWeights((experts.w13, w13_scale), (experts.w2, experts.w2_scale))

    def _blocks(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, n, k = w.shape
        q = torch.empty(s, n, k, dtype=FP8, device=w.device)
        sf = torch.empty(s, math.ceil(n / BLOCK), math.ceil(k / BLOCK), dtype=torch.float32, device=w.device)
        for i in range(s):
            q[i], sf[i] = quantize_blocks(w[i], self.pow2_scales)
        return q, sf

    def _lhs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, sf = quantize_rows(x, self.pow2_scales)
        if self._scale_layout is not None:
            sf = self._scale_layout(sf)
        return q, sf

    def contiguous(self, xs: torch.Tensor, counts: list[int], weights: DeepGemmWeights) -> torch.Tensor:
        """xs [N, D] sorted by slot, counts [S] rows per slot -> [N, D] in xs' dtype."""
        n, d = xs.shape
        if n == 0:
            return xs.new_empty(0, d)
        layout = contiguous_layout(counts, int(self.api.alignment()), xs.device)
        # Padding rows are zeros (as DeepGEMM's own tests lay them out): they quantize to zeros, give zeros.
        a = xs.new_zeros(layout.num_rows, d).index_copy_(0, layout.rows, xs)
        h = self._gemm_contiguous(a, weights.w13, layout.m_indices)  # [M, 2I]
        out = self._gemm_contiguous(silu_and_mul(h), weights.w2, layout.m_indices)  # [M, D]
        return out.index_select(0, layout.rows).to(xs.dtype)

    def _gemm_contiguous(self, a: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor], m_indices: torch.Tensor
                         ) -> torch.Tensor:
        out = torch.empty(a.shape[0], w[0].shape[1], dtype=torch.bfloat16, device=a.device)
        self.api.contiguous(self._lhs(a), w, out, m_indices)
        return out

    def masked(self, xs: torch.Tensor, counts: torch.Tensor, weights: DeepGemmWeights) -> torch.Tensor:
        """xs [S, C, D], counts [S] int valid rows per slot -> [S, C, D] in xs' dtype (rows past a count: garbage)."""
        s, c, d = xs.shape
        if s == 0 or c == 0:
            return xs.new_empty(s, c, d)
        # DeepGEMM 1.x asserts C % BLOCK_M == 0 once C exceeds its block M (64 to 256) with several groups;
        # padded rows cost only their quantization: the kernels stop at masked_m.
        cp = c if c <= 64 else -(-c // 256) * 256
        if cp != c:
            xs = torch.nn.functional.pad(xs, (0, 0, 0, cp - c))
        masked_m = counts.to(device=xs.device, dtype=torch.int32).contiguous()
        expected_m = self.expected_m or expected_rows(counts, c)
        h = self._gemm_masked(xs, weights.w13, masked_m, expected_m)  # [S, Cp, 2I]
        out = self._gemm_masked(silu_and_mul(h), weights.w2, masked_m, expected_m)  # [S, Cp, D]
        return out[:, :c].to(xs.dtype).contiguous()

    def _gemm_masked(self, a: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor], masked_m: torch.Tensor,
                     expected_m: int) -> torch.Tensor:
        s, c, _ = a.shape
        out = torch.empty(s, c, w[0].shape[1], dtype=torch.bfloat16, device=a.device)
        self.api.masked(self._lhs(a), w, out, masked_m, expected_m)
        return out

    def warm_up(self, weights: DeepGemmWeights, masked_capacity: int | None = None,
                contiguous_rows: int | None = None) -> int:
        """Run the kernels serving will run, so DeepGEMM compiles them now rather than in a step.

        masked_capacity: C of the masked layout (DeepEP low latency: budget * ep_size); one call per `masked_rungs`.
        contiguous_rows: the rows a step is expected to bring (tokens * top-k); one call per `contiguous_rungs`, up
            to the M those rows can pad to.
        Every rank must warm up before the group's first step (EPGroup.apply, then the worker's barrier).
        Returns the layer calls made (two GEMMs each); shapes warmed before are skipped.
        """
        calls = 0
        if masked_capacity:
            calls += self._warm_masked(weights, masked_capacity)
        if contiguous_rows:
            calls += self._warm_contiguous(weights, contiguous_rows)
        if calls and weights.w13[0].is_cuda:
            torch.cuda.synchronize(weights.w13[0].device)  # compiled and run here, not in the first step
        return calls

    def _warm_masked(self, weights: DeepGemmWeights, capacity: int) -> int:
        s, _, d = weights.w13[0].shape
        rungs = [self.expected_m] if self.expected_m else masked_rungs(capacity)
        rungs = [m for m in rungs if self._first_time(("masked", capacity, m), weights)]
        if rungs:
            xs = weights.w13[0].new_zeros(s, capacity, d, dtype=torch.bfloat16)
            for m in rungs:  # every slot holding m rows makes expected_m = m
                self.masked(xs, xs.new_full((s,), m, dtype=torch.int64), weights)
        return len(rungs)

    def _warm_contiguous(self, weights: DeepGemmWeights, rows: int) -> int:
        s, _, d = weights.w13[0].shape
        alignment = int(self.api.alignment())
        rungs = [m for m in contiguous_rungs(rows, alignment, s) if self._first_time(("contiguous", m), weights)]
        for m in rungs:
            self.contiguous(weights.w13[0].new_zeros(m, d, dtype=torch.bfloat16), _spread(m, s, alignment), weights)
        return len(rungs)

    def _first_time(self, what: tuple, weights: DeepGemmWeights) -> bool:
        """Whether `what` is new for weights of these shapes (all MoE layers share theirs); records it."""
        key = (*what, tuple(weights.w13[0].shape), tuple(weights.w2[0].shape))
        new = key not in self._warmed
        self._warmed.add(key)
        return new


def masked_rungs(capacity: int) -> list[int]:
    """The masked kernels' `expected_m` values to warm for C = `capacity`: one per 64 rows, the last clamped to C.

    DeepGEMM picks block M (64 or 128 on Hopper in 2.x; 64, 128 or 256 in 1.x) and the tiling from
    ceil(expected_m / block M), which ceil(expected_m / 64) determines: each rung stands for the 64 values below it.
    """
    return sorted({min(m, capacity) for m in range(64, capacity + 64, 64)})


def contiguous_rungs(rows: int, alignment: int, groups: int) -> list[int]:
    """Padded row counts M to warm the contiguous kernels with: the alignment, doubled, up to the most that `rows`
    rows over `groups` slots can pad to (every busy slot takes whole aligned blocks: at most
    min(rows, groups) + (rows - min(rows, groups)) // alignment of them).

    Block M is the alignment there and DeepGEMM picks the tiling from M's waves over the SMs; doubling reaches the
    tilings of small through full steps without one call per size (a size between rungs may still compile one
    kernel: seconds, not every kernel of the first step at once).
    """
    busy = min(rows, groups)
    top = alignment * max(1, busy + (rows - busy) // alignment)
    rungs, m = [], alignment
    while m < top:
        rungs.append(m)
        m *= 2
    return [*rungs, top]


def _spread(rows: int, groups: int, alignment: int) -> list[int]:
    """`rows` (a multiple of `alignment`) over `groups` slots in whole aligned blocks: padded M is `rows` exactly."""
    blocks = rows // alignment
    return [alignment * (blocks // groups + (g < blocks % groups)) for g in range(groups)]


def expected_rows(counts: torch.Tensor, capacity: int) -> int:
    """The masked kernels' `expected_m`: mean rows over slots that have any, in [1, capacity] (syncs once)."""
    total, busy = torch.stack([counts.sum(), (counts > 0).sum()]).tolist()
    return max(1, min(-(-int(total) // max(int(busy), 1)), capacity))


# ---- the reference: what the kernels compute, in plain torch -------------------------------------------------------

def emulated_api(alignment: int = BLOCK) -> DeepGemmApi:
    """DeepGEMM's grouped GEMMs computed in float32 from the dequantized operands, on any device, checking the
    arguments as the kernels need them. The reference the real kernels are checked against."""
    return DeepGemmApi(_emulated_contiguous(alignment), _emulated_masked, lambda: alignment, None, ("emulated",))


def _check_operands(lhs: tuple[torch.Tensor, torch.Tensor], rhs: tuple[torch.Tensor, torch.Tensor],
                    out: torch.Tensor) -> None:
    (a, sfa), (b, sfb) = lhs, rhs
    k = a.shape[-1]
    if a.dtype != FP8 or b.dtype != FP8 or sfa.dtype != torch.float32 or sfb.dtype != torch.float32:
        raise TypeError(f"operands must be e4m3 with float32 scales, got {a.dtype}/{sfa.dtype}, {b.dtype}/{sfb.dtype}")
    if out.dtype != torch.bfloat16 or not out.is_contiguous():
        raise TypeError(f"out must be a contiguous bf16 tensor, got {out.dtype}")
    if b.shape[-1] != k or sfa.shape != (*a.shape[:-1], math.ceil(k / BLOCK)):
        raise ValueError(f"lhs {list(a.shape)} / scales {list(sfa.shape)} do not match rhs {list(b.shape)}")
    if sfb.shape != (b.shape[0], math.ceil(b.shape[1] / BLOCK), math.ceil(k / BLOCK)):
        raise ValueError(f"rhs scales must be [S, N/128, K/128], got {list(sfb.shape)} for rhs {list(b.shape)}")


def _emulated_contiguous(alignment: int) -> Callable[..., None]:
    def gemm(lhs: tuple[torch.Tensor, torch.Tensor], rhs: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor,
             m_indices: torch.Tensor) -> None:
        _check_operands(lhs, rhs, out)
        m = lhs[0].shape[0]
        if m_indices.dtype != torch.int32 or m_indices.shape != (m,) or m % alignment:
            raise ValueError(f"m_indices must be int32 [M] with M a multiple of {alignment}, "
                             f"got {m_indices.dtype} {list(m_indices.shape)}")
        blocks = m_indices.view(-1, alignment)
        first = blocks[:, :1]
        if bool(((blocks != first) & (blocks != -1)).any()):
            raise ValueError("every aligned block of m_indices must hold one group (padding: -1)")
        a = dequantize_rows(*lhs)
        out.zero_()
        for g in m_indices.unique().tolist():
            if g >= 0:
                rows = (m_indices == g).nonzero().squeeze(1)
                out[rows] = (a[rows] @ dequantize_blocks(rhs[0][g], rhs[1][g]).t()).to(out.dtype)
    return gemm


def _emulated_masked(lhs: tuple[torch.Tensor, torch.Tensor], rhs: tuple[torch.Tensor, torch.Tensor],
                     out: torch.Tensor, masked_m: torch.Tensor, expected_m: int) -> None:
    _check_operands(lhs, rhs, out)
    s, c, _ = lhs[0].shape
    if masked_m.dtype != torch.int32 or masked_m.shape != (s,) or not 0 < expected_m:
        raise ValueError(f"masked_m must be int32 [S] and expected_m > 0, got {masked_m.dtype} "
                         f"{list(masked_m.shape)}, {expected_m}")
    if s > 1 and c > 64 and c % BLOCK:
        raise ValueError(f"with several groups, C = {c} rows past one block must be a multiple of the block M")
    for g, m in enumerate(masked_m.tolist()):
        if m > c:
            raise ValueError(f"masked_m[{g}] = {m} exceeds the {c} rows of its group")
        if m:
            a = dequantize_rows(lhs[0][g, :m], lhs[1][g, :m])
            out[g, :m] = (a @ dequantize_blocks(rhs[0][g], rhs[1][g]).t()).to(out.dtype)
