"""Dispatch/combine of MoE tokens across an EP group: a small ABC plus a registry of lazily imported backends.

Legend: T local tokens, K experts per token, D hidden, N (token, expert) pairs this rank received,
S local slots, C rows per slot in the masked layout.

`dispatch_stages` sends each (token, physical slot) pair to the rank holding the slot; `combine_stages`
sends the expert outputs back and sums them per token with the routing weights (float32 accumulation).
Both are generators: each `yield` marks a point where communication is in flight and the caller may
compute something else (two-batch overlap runs the other micro-batch there); the generator's return value
is the result. `dispatch`/`combine` run them to the end. Every rank of the group must run both, with the
same number of resumptions, in the same order, even with T = 0: they are collectives.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from shared.ep.placement import ExpertPlacement

R = TypeVar("R")
Stages = Generator[None, None, R]


def run_stages(stages: Stages[R]) -> R:
    """Drive a stage generator to its end without overlapping anything; its return value."""
    while True:
        try:
            next(stages)
        except StopIteration as done:
            return done.value


@dataclass
class Received:
    """What a rank received to compute, in one of two layouts.

    contiguous: x [N, D] one row per (token, local slot) pair, slots [N] int64 local slot of each row.
    masked: x [S, C, D] rows grouped per local slot, counts [S] int64 valid rows at the front of each slot.
    The expert outputs go back to `combine` in the same layout and order.
    """

    x: torch.Tensor
    slots: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    @property
    def masked(self) -> bool:
        return self.counts is not None


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
    def dispatch_stages(self, x: torch.Tensor, phys_ids: torch.Tensor, weights: torch.Tensor
                        ) -> Stages[tuple[Received, Any]]:
        """x [T, D], phys_ids [T, K] int64 physical slots (-1: none), weights [T, K] float32 ->
        (what this rank computes, a handle for `combine_stages`)."""

    @abstractmethod
    def combine_stages(self, y: torch.Tensor, handle: Any) -> Stages[torch.Tensor]:
        """y: expert outputs in the layout and order of `Received.x` -> [T, D] weighted sum per token, x's dtype."""

    def dispatch(self, x: torch.Tensor, phys_ids: torch.Tensor, weights: torch.Tensor) -> tuple[Received, Any]:
        return run_stages(self.dispatch_stages(x, phys_ids, weights))

    def combine(self, y: torch.Tensor, handle: Any) -> torch.Tensor:
        return run_stages(self.combine_stages(y, handle))


@dataclass
class _A2AHandle:
    token_of_pair: torch.Tensor  # [M] local token of each sent pair, in send order (M <= T*K)
    weight_of_pair: torch.Tensor  # [M] float32 routing weight of each sent pair, in send order
    send_counts: list[int]  # pairs sent to each rank
    recv_counts: list[int]  # pairs received from each rank
    num_tokens: int
    dtype: torch.dtype


class AllToAllDispatcher(Dispatcher):
    """`torch.distributed.all_to_all_single` with uneven splits (gloo on CPU, NCCL on GPU), asynchronous.

    One pair per (token, expert): a token whose K experts share a rank is sent that many times.
    Routing weights stay on the sending rank and are applied in `combine`. Three rounds: the counts
    (they size the buffers), then rows and slots together, then the outputs back.
    """

    def __init__(self, group: dist.ProcessGroup | None, placement: ExpertPlacement) -> None:
        super().__init__(group, placement)
        self._slot_start = torch.tensor([placement.local_slots(r).start for r in range(self.ep_size)],
                                        dtype=torch.int64)

    def dispatch_stages(self, x: torch.Tensor, phys_ids: torch.Tensor, weights: torch.Tensor
                        ) -> Stages[tuple[Received, _A2AHandle]]:
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
        work = dist.all_to_all_single(recv_counts_t, send_counts_t, group=self.group, async_op=True)
        send_x = x.index_select(0, token_of_pair).contiguous()
        local_slots = (slots - self._slot_start.to(x.device)[dest]).contiguous()
        weight_of_pair = weights.reshape(-1).to(device=x.device, dtype=torch.float32)[pair]
        yield
        work.wait()
        send_counts, recv_counts = send_counts_t.tolist(), recv_counts_t.tolist()
        n = sum(recv_counts)
        recv_x = x.new_empty(n, x.shape[1])
        recv_slots = torch.empty(n, dtype=torch.int64, device=x.device)
        works = [dist.all_to_all_single(recv_x, send_x, recv_counts, send_counts, group=self.group, async_op=True),
                 dist.all_to_all_single(recv_slots, local_slots, recv_counts, send_counts, group=self.group,
                                        async_op=True)]
        yield
        for w in works:
            w.wait()
        handle = _A2AHandle(token_of_pair, weight_of_pair, send_counts, recv_counts, x.shape[0], x.dtype)
        return Received(recv_x, slots=recv_slots), handle

    def combine_stages(self, y: torch.Tensor, handle: _A2AHandle) -> Stages[torch.Tensor]:
        back = y.new_empty(sum(handle.send_counts), y.shape[1])
        work = dist.all_to_all_single(back, y.contiguous(), handle.send_counts, handle.recv_counts,
                                      group=self.group, async_op=True)
        yield
        work.wait()
        out = torch.zeros(handle.num_tokens, y.shape[1], dtype=torch.float32, device=y.device)
        out.index_add_(0, handle.token_of_pair, back.float() * handle.weight_of_pair[:, None])
        return out.to(handle.dtype)


# Backends by name: a class, or "module:Class" imported only when chosen (GPU packages stay optional).
DISPATCHERS: dict[str, Callable[..., Dispatcher] | str] = {
    "all_to_all": AllToAllDispatcher,
    "deepep": "shared.ep.deepep:DeepEPDispatcher",
}


def make_dispatcher(name: str, group: dist.ProcessGroup | None, placement: ExpertPlacement, **options: Any
                    ) -> Dispatcher:
    """The dispatcher backend `name` for `group` (None: the default group). Fails now if it cannot run."""
    if name not in DISPATCHERS:
        raise ValueError(f"unknown dispatcher {name!r} (choose from {', '.join(DISPATCHERS)})")
    return resolve(DISPATCHERS[name])(group, placement, **options)


def resolve(entry: Callable[..., Any] | str) -> Callable[..., Any]:
    """A registry entry: the callable itself, or the attribute named by "module:attr" (imported now)."""
    if not isinstance(entry, str):
        return entry
    module, _, attr = entry.partition(":")
    return getattr(importlib.import_module(module), attr)
