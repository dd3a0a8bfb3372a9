"""Native kernels for the model's small layers at bf16: RMSNorm (`norm_bf16.c`), small linear layers at one to
four rows (`linear_bf16.c`), DeepSeek-V3's router at decode sizes (`router_bf16.c`) and MLA's rotary embedding
(`rope_bf16.c`).

The torch form of a bf16 RMSNorm is five ops (to float32, the fused norm, back to bf16, the weight's product) at
12-25 us a call on this machine at decode sizes; the native call takes 5-10 us, most of it the call itself, and
computes the same bits (the normalisation in float32, rounded to bf16 before the product, as the reference).

A oneDNN matmul on a prepacked weight costs 18-22 us at one row whatever the weight's size up to a megabyte; the
native dot products stream the weight at that size in 8-15 us (scripts/native_kernels_ab.py; docs/benchmarks.md).
From 4 rows oneDNN's blocked kernels catch up on all but the smallest weights, and on weights of several
megabytes they read memory faster than these kernels at every row count, hence the bounds below.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from moemesh.kernels import native
from moemesh.model.layers import Linear, RMSNorm
from moemesh.model.moe import Router
from moemesh.model.rope import RotaryEmbedding

# Measured bounds (one thread, weights cycled from memory; docs/benchmarks.md): the native kernel wins at one row
# up to about a megabyte of weight (level at 1-1.5 MB, behind beyond), and at 2-4 rows up to 640 KiB.
_ONE_ROW_MAX_BYTES = 1280 * 2**10
_FEW_ROWS_MAX_BYTES = 640 * 2**10
_FEW_ROWS = 4


class NativeRMSNorm:
    """An RMSNorm's kernel: bf16 rows on the CPU natively; None (the module's torch form) for anything else."""

    def __init__(self, lib: ctypes.CDLL, norm: RMSNorm) -> None:
        self.lib = lib
        self.eps = norm.eps
        self.weight = norm.weight.detach()  # a view: in-place weight writes are seen

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [..., D] -> [..., D], same dtype, or None to leave it to the module."""
        w = self.weight
        if x.dtype == w.dtype == torch.bfloat16 and x.device.type == w.device.type == "cpu" and w.is_contiguous():
            return native.rms_norm(self.lib, x, w, self.eps)
        return None


class NativeLinear:
    """A `Linear`'s kernel: the native dot products for steps of a few rows where they win, `fallback` (the oneDNN
    packed matmul) otherwise. Reads the layer's weight where it lies (in-place writes are seen)."""

    def __init__(self, lib: ctypes.CDLL, layer: Linear, fallback: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.lib = lib
        self.fallback = fallback
        self.weight = layer.weight.detach()
        self.bias = None if layer.bias is None else layer.bias.detach()
        nbytes = self.weight.numel() * self.weight.element_size()
        self.max_rows = _FEW_ROWS if nbytes <= _FEW_ROWS_MAX_BYTES else 1 if nbytes <= _ONE_ROW_MAX_BYTES else 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] bf16 -> [..., out] bf16."""
        if x.numel() <= self.max_rows * x.shape[-1] and x.numel() and x.dtype == torch.bfloat16:
            return native.linear(self.lib, x, self.weight, self.bias)
        return self.fallback(x)


# Steps of at most this many tokens take the native router; its per-token loops are scalar where the torch form's
# matmul is not, and at prefill sizes the ~18 ops' set-up no longer matters.
ROUTER_MAX_ROWS = 64


class NativeRouter:
    """A `Router`'s kernel for the `noaux_tc` method with sigmoid scores (DeepSeek-V3's): bf16 steps of at most
    ROUTER_MAX_ROWS tokens on the CPU natively; None (the module's torch form) otherwise."""

    def __init__(self, lib: ctypes.CDLL, router: Router) -> None:
        self.lib = lib
        self.router = router
        # Views: in-place writes (a loader, a weight update) are seen.
        self.weight = router.weight.detach()
        bias = router.e_score_correction_bias
        self.bias = None if bias is None else bias.detach()

    @staticmethod
    def takes(router: Router) -> bool:
        """Whether the router's method and groups are the ones the native kernel computes."""
        e, g = router.num_experts, router.n_group
        return (router.method == "noaux_tc" and router.scoring == "sigmoid" and e > 0 and g >= 1 and e % g == 0
                and e // g >= 2 and 1 <= router.topk_group <= g and 1 <= router.top_k <= router.topk_group * (e // g))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """x [T, D] -> (topk_ids [T, K] int64, topk_weights [T, K] float32), or None to leave it to the module."""
        r, w, bias = self.router, self.weight, self.bias
        if not (x.dtype == torch.bfloat16 and x.device.type == "cpu" and 0 < x.shape[0] <= ROUTER_MAX_ROWS):
            return None
        if not (w.dtype == torch.float32 and w.is_contiguous() and bias is not None and bias.dtype == torch.float32
                and bias.is_contiguous()):
            return None
        return native.router_noaux(self.lib, x, w, bias, r.n_group, r.topk_group, r.top_k,
                                   bool(r.norm_topk_prob), float(r.scaling))


class NativeRope:
    """A `RotaryEmbedding`'s kernel: bf16 steps on the CPU natively; None (the module's torch form) otherwise, and
    for positions past its tables (which the module then grows).

    The torch form's ~18 small ops cost ~50 us a layer at decode sizes; at prefill sizes its complex product is
    vectorised but makes float32 and complex copies of every row: on an AMD Zen 4 core, one thread, the small shape's
    rope (6 heads of 64) at 64 / 512 / 2048 tokens took 73 / 277 / 1214 us in torch against 11 / 44 / 157 us here."""

    def __init__(self, lib: ctypes.CDLL, rope: RotaryEmbedding) -> None:
        self.lib = lib
        self.rope = rope  # its tables are read at each call: the module replaces them when it grows them

    def __call__(self, positions: torch.Tensor, q_pe: torch.Tensor, k_pe: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """positions [T] int64, q_pe [T, H, R], k_pe [T, R] -> rotated (q_pe, k_pe), or None."""
        cos, sin = self.rope.cos_cached, self.rope.sin_cached
        if not (q_pe.dtype == k_pe.dtype == torch.bfloat16 and q_pe.shape[0] > 0
                and q_pe.device.type == "cpu" and positions.dtype == torch.int64 and q_pe.stride(-1) == 1
                and k_pe.stride(-1) == 1 and cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous()
                and sin.is_contiguous() and q_pe.shape[-1] % 2 == 0):
            return None
        return native.rope(self.lib, positions, q_pe, k_pe, cos, sin, self.rope.interleave)
