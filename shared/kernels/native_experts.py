"""The routed experts in one native call per layer: `moe_bf16.c` at decode sizes, `moe_gemm_bf16.c` beyond.

A decode step's MoE layer reads a few megabytes of experts; oneDNN's per-call set-up (15-20 us a matmul, two
per expert) and the torch ops around it cost more than reading them. The native kernel takes the layer's
tokens, their choices and the stacked weights in one call, groups the (token, expert) pairs by expert and
streams each chosen expert's weights once, every token of that expert against each row. Measured on one layer
(one thread, five layers' weights cycled so they come from memory; docs/benchmarks.md): 2.2-3.7x faster than the
oneDNN forms at 1-4 tokens on the small shape, 1.6-1.7x at 16-32, 1.2-1.3x on the compute shape's larger
experts.

Larger steps (prefill chunks) take the second kernel, over a copy of the weights kept pair-interleaved, which
replaces oneDNN's packed copy (so the layer still holds its weights twice): measured on the small shape's experts,
1.7-2.0x oneDNN's per-expert matmuls at 32-512 tokens. Without input blocking it loses to oneDNN on wider
experts (the compute shape's: 0.86x at 128 tokens, 0.75x at 2048), so layers with a hidden or intermediate size
above PAIRS_MAX_INPUT, or not a multiple of 16, keep the oneDNN forms for larger steps.
"""

from __future__ import annotations

import ctypes

import torch

from moemesh.kernels import native
from moemesh.model.moe import ExpertsKernel

# Steps of at most this many tokens take the native kernel. Measured (scripts/native_kernels_ab.py): 1.2-3.7x
# at 1-32 tokens on both benchmark shapes; at 64 still 1.46x on the small one but 0.95x on the compute one,
# whose ~6 rows per expert of [1024, 384] make AMX's matrix throughput count more than oneDNN's call set-up.
MAX_ROWS = 32


# The widest input (hidden size for gate-up, intermediate for down) the larger-steps kernel takes. It keeps no
# input blocking: a block of 64 output columns over K inputs is K x 128 bytes of weights, re-read per 4 tokens,
# which must stay in the L1 cache. Measured: the small shape (384 and 192) 1.7-2.0x oneDNN at 32-512 tokens; the
# compute shape (1024 and 384) 0.86x at 128 tokens, level at 512, 0.75x at 2048.
PAIRS_MAX_INPUT = 384


def pairs_fit(w13: torch.Tensor) -> bool:
    """Whether `moe_gemm_bf16.c` takes experts w13 [E, 2I, D]: D and I multiples of 16, neither above
    PAIRS_MAX_INPUT."""
    _, two_i, d = w13.shape
    return d % 16 == 0 and two_i % 32 == 0 and max(d, two_i // 2) <= PAIRS_MAX_INPUT


class NativeExperts:
    """An `ExpertsKernel` (moemesh.model.moe): the native one-call layer, `moe_bf16.c` for steps of at most
    MAX_ROWS tokens and `moe_gemm_bf16.c` beyond; `fallback`'s forms (oneDNN's `PackedExperts`) for larger steps
    where the second cannot run (`fallback` is None where it can). Reads the module's weights, w13 [E, 2I, D] and
    w2 [E, D, I] bf16, at every call, and remakes its pair-interleaved copy whenever they were written (their
    version counters move), so in-place expert moves are seen."""

    def __init__(self, lib: ctypes.CDLL, w13: torch.Tensor, w2: torch.Tensor,
                 fallback: ExpertsKernel | None) -> None:
        self.lib = lib
        self.w13 = w13.detach()
        self.w2 = w2.detach()
        self.fallback = fallback
        self._pairs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pairs_key: tuple[int, int] | None = None

    def __call__(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The grouped SwiGLU GEMM: xs [P, D] rows grouped by expert, counts [E] -> [P, D]. Only the fallback's:
        every_expert takes every step when there is no fallback."""
        assert self.fallback is not None
        return self.fallback(xs, counts)

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights pair-interleaved for `moe_gemm_bf16.c` (made at first use, remade after a weight write)."""
        key = (self.w13._version, self.w2._version)
        if self._pairs is None or self._pairs_key != key:
            self._pairs = (native.pairs(self.w13), native.pairs(self.w2))
            self._pairs_key = key
        return self._pairs

    def every_expert(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     counts: list[int]) -> torch.Tensor | None:
        """x [T, D] bf16, topk_ids [T, K] int64, topk_weights [T, K] float32 -> the weighted sum of each token's
        experts [T, D] bf16 (None where the grouped form takes the step)."""
        if x.shape[0] <= MAX_ROWS:
            return native.moe_experts(self.lib, x, topk_ids, topk_weights, self.w13, self.w2)
        if self.fallback is None:
            return native.moe_experts_pairs(self.lib, x, topk_ids, topk_weights, *self.pairs())
        return self.fallback.every_expert(x, topk_ids, topk_weights, counts)

