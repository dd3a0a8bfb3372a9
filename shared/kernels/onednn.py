"""CPU kernels over weights prepacked once for oneDNN (bf16 on AMX / AVX-512-BF16).

A plain bf16 `F.linear` on CPU reorders its weight into the matrix units' blocked layout on every call;
at decode batch sizes that reorder costs more than the product (measured here: a [768, 1024] weight at 4
rows takes 70 us plain and 40 us prepacked, which is the time to read its 1.5 MB once). Prepacking keeps
the reordered copy beside the weight; the math, and every output bit, is oneDNN's as before.

The weights stay the model's parameters of record (EP slicing, expert moves and checkpoints read them); the
packed copies cost as much memory again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.kernels import native
from moemesh.kernels.native_attention import (
    NativePrefillAttention,
    paged_decode,  # noqa: F401  (this set's decode attention)
)
from moemesh.kernels.native_decoder import NativeDecoderAttention, NativeDecoderMoE
from moemesh.kernels.native_experts import NativeExperts, pairs_fit
from moemesh.kernels.native_layers import NativeLinear, NativeRMSNorm, NativeRope, NativeRouter
from moemesh.model.deepseek import DecoderLayer
from moemesh.model.layers import Linear, RMSNorm
from moemesh.model.mla import MLAttention
from moemesh.model.moe import RoutedExperts, Router
from moemesh.model.rope import RotaryEmbedding

# The row count oneDNN is told to expect: decode-sized; the packed layout serves any row count.
_ROWS_HINT = 16
# Layers whose routed experts take at most this much memory also keep them packed as two matrices over every
# expert (see PackedExperts.every_expert); the copy costs as much memory again. That form serves steps of at most
# _EVERY_EXPERT_MAX_ROWS tokens that touch at least a third of the experts.
_EVERY_EXPERT_MAX_BYTES = 16 * 2**20
_EVERY_EXPERT_MAX_ROWS = 32


def supported(dtype: torch.dtype, device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"it runs on the CPU, the model is on {device}"
    if dtype != torch.bfloat16:
        return f"it runs bfloat16 weights, the model's are {str(dtype).removeprefix('torch.')}"
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU or torch build has no oneDNN bfloat16 support"
    return None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] bf16 -> the same matrix in oneDNN's blocked layout (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _ROWS_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] bf16, packed from `pack` ([N, K]) -> x @ W^T (+ bias), [..., N] bf16."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear:
    """A `Linear`'s kernel: its weight packed once."""

    def __init__(self, layer: nn.Linear) -> None:
        self.packed = pack(layer.weight)
        self.bias = layer.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)


class PackedExperts:
    """A grouped SwiGLU GEMM over E experts' packed weights: w13 [E, 2I, D], w2 [E, D, I].

    Small layers also keep every expert's weights as two matrices, gate-up [E * 2I, D] (expert by expert) and
    down [D, E * I] (the experts' inputs side by side), for `every_expert`.
    """

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, every_expert: bool = True) -> None:
        """`every_expert=False`: no matrices over every expert (a caller that never asks for that form)."""
        self.w13 = [pack(w) for w in w13]
        self.w2 = [pack(w) for w in w2]
        self.num_experts, two_i, d = w13.shape
        self.intermediate = two_i // 2
        self.all13 = self.all2 = None
        if every_expert and (w13.numel() + w2.numel()) * w13.element_size() <= _EVERY_EXPERT_MAX_BYTES:
            self.all13 = pack(w13.detach().reshape(-1, d))
            self.all2 = pack(w2.detach().permute(1, 0, 2).reshape(d, -1))

    def __call__(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """xs [P, D] rows grouped by expert, counts [E] rows per expert -> [P, D]."""
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                # At decode sizes every op saved per expert counts: one concatenation beats a copy per expert.
                outs.append(self.one(e, xs[start:start + n]))
                start += n
        return torch.cat(outs) if outs else xs.new_empty(0, xs.shape[1])

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU MLP: x [n, D] -> [n, D]; silu(gate) * up as silu_and_mul computes it, in place."""
        gate, up = packed_linear(x, self.w13[e]).chunk(2, dim=-1)
        return packed_linear(F.silu(gate).mul_(up), self.w2[e])

    def every_expert(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     counts: list[int]) -> torch.Tensor | None:
        """x [T, D] bf16, topk_ids [T, K] int64, topk_weights [T, K] float32 -> the weighted sum of each token's
        experts [T, D] bf16, as two matmuls over every expert, the unchosen ones weighted zero; None where the
        grouped form is cheaper.

        A decode step touches most experts of a small layer, a few rows each, and then the per-expert calls'
        fixed cost dominates (measured at 24 experts of [384, 192], top-4, one thread: 580 us grouped against
        410 us here at 4 tokens, 1660 against 770 at 16, even at 64; the grouped form wins below about a third of
        the experts touched). The weighting moves before the down projection (it is linear), whose sum over experts is
        then the combine, accumulated in float32 inside the matmul.
        """
        t = x.shape[0]
        if self.all13 is None or t > _EVERY_EXPERT_MAX_ROWS or 3 * sum(1 for n in counts if n) < self.num_experts:
            return None
        gates = x.new_zeros(t, self.num_experts).scatter_(1, topk_ids, topk_weights.to(x.dtype))  # [T, E]
        h = packed_linear(x, self.all13).view(t, self.num_experts, 2, self.intermediate)  # [T, E, gate|up, I]
        act = F.silu(h[:, :, 0]).mul_(h[:, :, 1]).mul_(gates[:, :, None])  # [T, E, I]
        return packed_linear(act.view(t, -1), self.all2)


def experts_kernel(w13: torch.Tensor, w2: torch.Tensor) -> NativeExperts | PackedExperts:
    """The kernel for routed experts w13 [E, 2I, D], w2 [E, D, I] bf16: the native one in front of the packed
    forms where it can run, else the packed forms alone (with their matrices over every expert: the decode form
    without the native kernel)."""
    lib = native.library()
    if lib is None or not (w13.is_contiguous() and w2.is_contiguous()):
        return PackedExperts(w13, w2)
    # The native kernels take every step the every-expert matrices would, and every larger one where their
    # pair-interleaved copy can be made (it replaces oneDNN's packed copy).
    if pairs_fit(w13):
        return NativeExperts(lib, w13, w2, None)
    return NativeExperts(lib, w13, w2, PackedExperts(w13, w2, every_expert=False))


def install(model: nn.Module) -> int:
    """Give every `Linear` and `RoutedExperts` of `model` its packed kernel; returns how many layers took one.

    The routed experts also take the native one-call kernels, linear layers the native dot products at one to
    four rows, RMSNorms, V3's router, the rotary embedding and prefill attention their native kernels, and decoder
    layers whose attention half or MoE half runs natively throughout take it in one call at decode sizes, where the
    native kernels build and run (`moemesh.kernels.native`; `MOEMESH_NATIVE_KERNELS=0` turns them off)."""
    n = 0
    lib = native.library()
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.kernel = None if lib is None else NativeRMSNorm(lib, m)
            n += lib is not None
        elif isinstance(m, Router):
            m.kernel = NativeRouter(lib, m) if lib is not None and NativeRouter.takes(m) else None
            n += m.kernel is not None
        elif isinstance(m, RotaryEmbedding):
            m.kernel = None if lib is None else NativeRope(lib, m)
            n += lib is not None
        elif isinstance(m, MLAttention):
            m.prefill_kernel = None if lib is None else NativePrefillAttention(lib, m)
            n += lib is not None
        elif isinstance(m, Linear):
            packed = PackedLinear(m)
            bf16 = torch.bfloat16
            usable = (lib is not None and m.weight.dtype == bf16 and m.weight.is_contiguous()
                      and (m.bias is None or (m.bias.dtype == bf16 and m.bias.is_contiguous())))
            m.kernel = NativeLinear(lib, m, packed) if usable else packed
            n += 1
        elif isinstance(m, RoutedExperts) and m.num_experts and m.fp8_block is None:  # FP8 ones stay 8-bit
            m.kernel = experts_kernel(m.w13, m.w2)
            n += 1
    for m in model.modules():  # after the linear layers: it takes steps only where each of theirs would run natively
        if isinstance(m, DecoderLayer):
            rows = 0 if lib is None else NativeDecoderAttention.max_rows_of(m)
            m.attention_kernel = NativeDecoderAttention(lib, m, rows) if rows else None
            moe_rows = 0 if lib is None else NativeDecoderMoE.max_rows_of(m)
            m.mlp_kernel = NativeDecoderMoE(lib, m, moe_rows) if moe_rows else None
            n += (rows > 0) + (moe_rows > 0)
    return n
