"""The routed experts at decode sizes in one native call (`moe_bf16.c`), in front of the oneDNN forms.

A decode step's MoE layer reads a few megabytes of experts; oneDNN's per-call set-up (15-20 us a matmul, two
per expert) and the torch ops around it cost more than reading them. The native kernel takes the layer's
tokens, their choices and the stacked weights in one call, groups the (token, expert) pairs by expert and
streams each chosen expert's weights once, every token of that expert against each row. Measured on one layer
(one thread, five layers' weights cycled so they come from memory; docs/benchmarks.md): 2.2-3.7x faster than the
oneDNN forms at 1-4 tokens on the small shape, 1.6-1.7x at 16-32, 1.2-1.3x on the compute shape's larger
experts; larger steps (prefill chunks) keep oneDNN's AMX matmuls.
"""

from __future__ import annotations

import ctypes

import torch

from moemesh.kernels import native
from moemesh.model.moe import ExpertsKernel

# Steps of at most this many tokens take the native kernel. Measured (scripts/native_experts_ab.py): 1.2-3.7x
# at 1-32 tokens on both benchmark shapes; at 64 still 1.46x on the small one but 0.95x on the compute one,
# whose ~6 rows per expert of [1024, 384] make AMX's matrix throughput count more than oneDNN's call set-up.
MAX_ROWS = 32


class NativeExperts:
    """An `ExpertsKernel` (moemesh.model.moe): the native one-call layer for steps of at most MAX_ROWS tokens,
    `fallback`'s forms (oneDNN's `PackedExperts`) otherwise. Reads the module's own weights, w13 [E, 2I, D] and
    w2 [E, D, I] bf16, at every call (so in-place expert moves are seen)."""

    def __init__(self, lib: ctypes.CDLL, w13: torch.Tensor, w2: torch.Tensor, fallback: ExpertsKernel) -> None:
        self.lib = lib
        self.w13 = w13.detach()
        self.w2 = w2.detach()
        self.fallback = fallback

    def __call__(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The grouped SwiGLU GEMM (larger steps): xs [P, D] rows grouped by expert, counts [E] -> [P, D]."""
        return self.fallback(xs, counts)

    def every_expert(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     counts: list[int]) -> torch.Tensor | None:
        """x [T, D] bf16, topk_ids [T, K] int64, topk_weights [T, K] float32 -> the weighted sum of each token's
        experts [T, D] bf16 (None where the grouped form takes the step)."""
        if x.shape[0] <= MAX_ROWS:
            return native.moe_experts(self.lib, x, topk_ids, topk_weights, self.w13, self.w2)
        return self.fallback.every_expert(x, topk_ids, topk_weights, counts)

