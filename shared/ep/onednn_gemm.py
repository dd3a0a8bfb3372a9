"""The grouped expert GEMM of an EP rank in bf16 on a CPU: each local slot's weights prepacked once for oneDNN.

Legend: S local slots, N rows received, C rows per slot in the masked layout, D hidden, I expert intermediate size.
The math and every output bit are TorchGroupedGemm's contiguous form (one matmul pair per slot with rows), as in
the single-process engine's kernel (`moemesh.kernels.onednn`); only the weight re-layout per call is gone.
"""

from __future__ import annotations

import torch

from moemesh.ep.experts import GroupedGemm
from moemesh.kernels import onednn


class OneDnnGroupedGemm(GroupedGemm):
    """Fails at construction on a CPU or torch build without oneDNN bf16 (choose 'torch' there)."""

    def __init__(self) -> None:
        why_not = onednn.supported(torch.bfloat16, torch.device("cpu"))
        if why_not:
            raise RuntimeError(f"grouped GEMM 'onednn' cannot run here: {why_not}; use grouped GEMM 'torch'")

    def prepare(self, w13: torch.Tensor, w2: torch.Tensor) -> onednn.PackedExperts:
        """w13 [S, 2I, D], w2 [S, D, I], bf16 on the CPU -> their prepacked forms."""
        why_not = onednn.supported(w13.dtype, w13.device)
        if why_not:
            raise ValueError(f"grouped GEMM 'onednn': {why_not}")
        return onednn.PackedExperts(w13, w2, every_expert=False)  # EP groups rows by slot; never that form

    def prepare_slots(self, weights: onednn.PackedExperts, w13: torch.Tensor, w2: torch.Tensor,
                      slots: list[int]) -> onednn.PackedExperts:
        """The slots a switch wrote packed again, the others' packed copies kept (packing a whole layer at a step
        boundary costs a copy of all its experts)."""
        for s in slots:
            weights.w13[s] = onednn.pack(w13[s])
            weights.w2[s] = onednn.pack(w2[s])
        return weights

    def contiguous(self, xs: torch.Tensor, counts: list[int], weights: onednn.PackedExperts) -> torch.Tensor:
        """xs [N, D] sorted by slot, counts [S] -> [N, D]."""
        return weights(xs, counts)

    def masked(self, xs: torch.Tensor, counts: torch.Tensor, weights: onednn.PackedExperts) -> torch.Tensor:
        """xs [S, C, D], counts [S] valid rows per slot -> [S, C, D] (rows past a count are garbage)."""
        rows = counts.tolist()
        out = torch.empty_like(xs)
        for s, n in enumerate(rows):
            if n:
                out[s, :n] = weights.one(s, xs[s, :n])
        return out
