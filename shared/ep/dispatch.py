"""Dispatch/combine of MoE tokens across an EP group: a small ABC plus a registry of lazily imported backends.

Legend: T local tokens, K experts per token, D hidden, N (token, expert) pairs this rank received.

`dispatch` sends each (token, physical slot) pair to the rank holding the slot; `combine` sends the
expert outputs back and sums them per token with the routing weights (float32 accumulation). Every rank
of the group must call both, in the same order, even with T = 0: they are collectives.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from shared.ep.placement import ExpertPlacement


class Dispatcher(ABC):
    """Moves tokens to the ranks holding their experts' slots and the outputs back."""

    def __init__(self, group: dist.ProcessGroup | None, placement: ExpertPlacement) -> None:
        self.group = group
        self.placement = placement
        self.rank = dist.get_rank(group)
        self.ep_size = dist.get_world_size(group)
        if placement.ep_size != self.ep_size:
            raise ValueError(f"placement is for ep_size {placement.ep_size}, the group has {self.ep_size} ranks")

    @abstractmethod
    def dispatch(self, x: torch.Tensor, phys_ids: torch.Tensor, weights: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """x [T, D], phys_ids [T, K] physical slots, weights [T, K] ->
        (recv_x [N, D], recv_slots [N] int64 local slot index on this rank, handle for `combine`)."""

    @abstractmethod
    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        """y [N, D] expert outputs in `recv_x` order -> [T, D] weighted sum per token, in x's dtype."""


@dataclass
class _A2AHandle:
    token_of_pair: torch.Tensor  # [M] local token of each sent pair, in send order (M <= T*K)
    weight_of_pair: torch.Tensor  # [M] float32 routing weight of each sent pair, in send order
    send_counts: list[int]  # pairs sent to each rank
    recv_counts: list[int]  # pairs received from each rank
    num_tokens: int
    dtype: torch.dtype


class AllToAllDispatcher(Dispatcher):
    """`torch.distributed.all_to_all_single` with uneven splits (gloo on CPU, NCCL on GPU).

    One pair per (token, expert): a token whose K experts share a rank is sent that many times.
    Routing weights stay on the sending rank and are applied in `combine`.
    """

    def __init__(self, group: dist.ProcessGroup | None, placement: ExpertPlacement) -> None:
        super().__init__(group, placement)
        self._slot_start = torch.tensor([placement.local_slots(r).start for r in range(self.ep_size)],
                                        dtype=torch.int64)

    def dispatch(self, x: torch.Tensor, phys_ids: torch.Tensor, weights: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, _A2AHandle]:
        k = max(phys_ids.shape[1], 1) if phys_ids.dim() == 2 else 1
        slots = phys_ids.reshape(-1).to(device=x.device, dtype=torch.int64)
        pair = torch.arange(slots.numel(), device=x.device)
        valid = slots >= 0  # -1: a padding entry, sent nowhere
        pair, slots = pair[valid], slots[valid]
        dest = torch.as_tensor(self.placement.rank_of_slot(slots), device=x.device).to(torch.int64)
        order = torch.argsort(dest, stable=True)
        pair, dest, slots = pair[order], dest[order], slots[order]
        token_of_pair = pair // k
        send_counts_t = torch.bincount(dest, minlength=self.ep_size)
        recv_counts_t = torch.empty_like(send_counts_t)
        dist.all_to_all_single(recv_counts_t, send_counts_t, group=self.group)
        send_counts, recv_counts = send_counts_t.tolist(), recv_counts_t.tolist()
        n = sum(recv_counts)

        send_x = x.index_select(0, token_of_pair).contiguous()
        recv_x = x.new_empty(n, x.shape[1])
        dist.all_to_all_single(recv_x, send_x, recv_counts, send_counts, group=self.group)
        local_slots = (slots - self._slot_start.to(x.device)[dest]).contiguous()
        recv_slots = torch.empty(n, dtype=torch.int64, device=x.device)
        dist.all_to_all_single(recv_slots, local_slots, recv_counts, send_counts, group=self.group)

        weight_of_pair = weights.reshape(-1).to(device=x.device, dtype=torch.float32)[pair]
        handle = _A2AHandle(token_of_pair, weight_of_pair, send_counts, recv_counts, x.shape[0], x.dtype)
        return recv_x, recv_slots, handle

    def combine(self, y: torch.Tensor, handle: _A2AHandle) -> torch.Tensor:
        back = y.new_empty(sum(handle.send_counts), y.shape[1])
        dist.all_to_all_single(back, y.contiguous(), handle.send_counts, handle.recv_counts, group=self.group)
        out = torch.zeros(handle.num_tokens, y.shape[1], dtype=torch.float32, device=y.device)
        out.index_add_(0, handle.token_of_pair, back.float() * handle.weight_of_pair[:, None])
        return out.to(handle.dtype)


class DeepEPDispatcher(Dispatcher):
    """DeepEP normal (prefill) and low-latency (decode) kernels. Not wired yet: fails at construction."""

    def __init__(self, group: dist.ProcessGroup | None, placement: ExpertPlacement) -> None:
        try:
            import deep_ep  # noqa: F401
        except ImportError as e:
            raise RuntimeError(
                "dispatcher 'deepep' needs the `deep_ep` package, which is not installed; "
                "use dispatcher='all_to_all' (torch.distributed) instead") from e
        raise NotImplementedError("dispatcher 'deepep' is not implemented yet; use dispatcher='all_to_all'")

    def dispatch(self, x: torch.Tensor, phys_ids: torch.Tensor, weights: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        raise NotImplementedError

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        raise NotImplementedError


DISPATCHERS: dict[str, Callable[[dist.ProcessGroup | None, ExpertPlacement], Dispatcher]] = {
    "all_to_all": AllToAllDispatcher,
    "deepep": DeepEPDispatcher,
}


def make_dispatcher(name: str, group: dist.ProcessGroup | None, placement: ExpertPlacement) -> Dispatcher:
    """The dispatcher backend `name` for `group` (None: the default group). Fails now if it cannot run."""
    if name not in DISPATCHERS:
        raise ValueError(f"unknown dispatcher {name!r} (choose from {', '.join(DISPATCHERS)})")
    return DISPATCHERS[name](group, placement)
