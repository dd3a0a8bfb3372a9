"""Expert-parallel routed experts: this rank's slots' weights, dispatch, a grouped GEMM, combine.

Legend: T local tokens, K experts per token, D hidden, I expert intermediate size, S local slots,
N (token, expert) pairs received by this rank.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from shared.ep.dispatch import Dispatcher
from shared.ep.placement import ExpertPlacement
from shared.model.layers import silu_and_mul
from shared.model.moe import RoutedExperts


class GroupedGemm(ABC):
    """The SwiGLU expert MLP over tokens grouped by local slot."""

    @abstractmethod
    def __call__(self, xs: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """xs [N, D] sorted by slot, counts [S] rows per slot, w13 [S, 2I, D], w2 [S, D, I] -> [N, D]."""


class TorchGroupedGemm(GroupedGemm):
    """One matmul pair per slot that received rows."""

    def __call__(self, xs: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(xs)
        start = 0
        for s, n in enumerate(counts):
            if n:
                seg = xs[start:start + n]
                out[start:start + n] = silu_and_mul(seg @ w13[s].t()) @ w2[s].t()
                start += n
        return out


class DeepGemmGroupedGemm(GroupedGemm):
    """DeepGEMM FP8 contiguous (prefill) / masked (decode) layouts. Not wired yet: fails at construction."""

    def __init__(self) -> None:
        try:
            import deep_gemm  # noqa: F401
        except ImportError as e:
            raise RuntimeError(
                "grouped GEMM 'deepgemm' needs the `deep_gemm` package, which is not installed; "
                "use gemm='torch' instead") from e
        raise NotImplementedError("grouped GEMM 'deepgemm' is not implemented yet; use gemm='torch'")

    def __call__(self, xs: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


GEMMS: dict[str, Callable[[], GroupedGemm]] = {"torch": TorchGroupedGemm, "deepgemm": DeepGemmGroupedGemm}


def make_grouped_gemm(name: str) -> GroupedGemm:
    """The grouped GEMM backend `name`. Fails now if it cannot run."""
    if name not in GEMMS:
        raise ValueError(f"unknown grouped GEMM {name!r} (choose from {', '.join(GEMMS)})")
    return GEMMS[name]()


class EPExperts(nn.Module):
    """Drop-in for `RoutedExperts` in an EP group: holds only this rank's slots, `w13` [S, 2I, D], `w2` [S, D, I].

    `layer` is the MoE layer's index among MoE layers (the placement's L axis).
    """

    def __init__(self, experts: RoutedExperts, layer: int, placement: ExpertPlacement, dispatcher: Dispatcher,
                 gemm: GroupedGemm | str = "torch") -> None:
        super().__init__()
        if experts.num_experts != placement.num_logical:
            raise ValueError(f"placement has {placement.num_logical} logical experts, the layer has "
                             f"{experts.num_experts}")
        self.layer = layer
        self.placement = placement
        self.dispatcher = dispatcher
        self.gemm = make_grouped_gemm(gemm) if isinstance(gemm, str) else gemm
        self.num_experts = experts.num_experts
        slots = placement.local_slots(dispatcher.rank)
        self.num_local_slots = len(slots)
        logical = torch.as_tensor(placement.phy2log[layer, slots.start:slots.stop], dtype=torch.int64)
        device = experts.w13.device
        with torch.no_grad():
            self.w13 = nn.Parameter(experts.w13.index_select(0, logical.to(device)).clone(), requires_grad=False)
            self.w2 = nn.Parameter(experts.w2.index_select(0, logical.to(device)).clone(), requires_grad=False)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, D]; topk_ids [T, K] int64 logical experts; topk_weights [T, K] float32 -> [T, D] in x's dtype."""
        phys = self.placement.physical_ids(self.layer, topk_ids)
        recv_x, recv_slots, handle = self.dispatcher.dispatch(x, phys, topk_weights)
        order = torch.argsort(recv_slots, stable=True)
        counts = torch.bincount(recv_slots, minlength=self.num_local_slots).tolist()
        out_sorted = self.gemm(recv_x.index_select(0, order), counts, self.w13, self.w2)
        y = torch.empty_like(recv_x)
        y[order] = out_sorted
        return self.dispatcher.combine(y, handle)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, local_slots={self.num_local_slots}, rank={self.dispatcher.rank}"
