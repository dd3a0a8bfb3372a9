"""Dispatch/combine of MoE tokens across an EP group: a small ABC, the all-to-all backend, and `make_dispatcher`
(the backends are registered by name in `moemesh.ep.backends` and imported only when chosen).

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

from abc import ABC, abstractmethod
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from moemesh.ep.backends import DISPATCHERS
from moemesh.ep.placement import ExpertPlacement

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

    def close(self) -> None:  # noqa: B027 - an optional hook: most backends hold nothing to release
        """Release what the backend holds beyond Python's reach (DeepEP's buffers). Every rank calls it together,
        while the group is healthy: a backend may meet its peers here. Nothing to do by default."""


@dataclass
class _A2AHandle:
    row_token: torch.Tensor  # [R] local token of each row sent, in send order (one row per token and rank)
    row_of_pair: torch.Tensor  # [N] received row each received pair computes on
    weight_of_pair: torch.Tensor  # [N] float32 routing weight of each received pair
    num_recv_rows: int
    send_rows: list[int]  # rows sent to each rank
    recv_rows: list[int]  # rows received from each rank
    num_tokens: int
    dtype: torch.dtype


class AllToAllDispatcher(Dispatcher):
    """`torch.distributed.all_to_all_single` with uneven splits (gloo on CPU, NCCL on GPU), asynchronous.

    A token goes once to each rank holding any of its experts (as DeepEP sends it), with one small
    record per (token, expert) pair: the row it came in, the local slot, the routing weight. The
    receiving rank computes every pair, sums a row's pairs with their weights, and sends one row back
    per token; the sender adds up the rows of each token. Rounds: the counts (they size the buffers),
    then rows and records together, then the rows back.
    """

    def __init__(self, group: dist.ProcessGroup | None, placement: ExpertPlacement) -> None:
        super().__init__(group, placement)
        self._slot_start = torch.tensor([placement.local_slots(r).start for r in range(self.ep_size)],
                                        dtype=torch.int64)

    def dispatch_stages(self, x: torch.Tensor, phys_ids: torch.Tensor, weights: torch.Tensor
                        ) -> Stages[tuple[Received, _A2AHandle]]:
        dev, n_tok, ep = x.device, x.shape[0], self.ep_size
        k = max(phys_ids.shape[1], 1) if phys_ids.dim() == 2 else 1
        slots = phys_ids.reshape(-1).to(device=dev, dtype=torch.int64)
        pair = torch.arange(slots.numel(), device=dev)
        valid = slots >= 0  # -1: a padding entry, sent nowhere
        pair, slots = pair[valid], slots[valid]
        dest = torch.as_tensor(self.placement.rank_of_slot(slots), device=dev).to(torch.int64)
        order = torch.argsort(dest, stable=True)  # by rank, then by token: a (rank, token) row is one run
        pair, dest, slots = pair[order], dest[order], slots[order]
        stride = max(n_tok, 1)  # row key = rank * T + token
        rows, row_of_pair = torch.unique_consecutive(dest * stride + pair // k, return_inverse=True)
        row_dest, row_token = rows // stride, rows % stride
        send_rows_t = torch.bincount(row_dest, minlength=ep)
        send_counts_t = torch.stack([send_rows_t, torch.bincount(dest, minlength=ep)], dim=1)  # [ep, 2]
        recv_counts_t = torch.empty_like(send_counts_t)
        work = dist.all_to_all_single(recv_counts_t, send_counts_t, group=self.group, async_op=True)
        send_x = x.index_select(0, row_token).contiguous()
        row_start = torch.cumsum(send_rows_t, 0) - send_rows_t
        weight_bits = weights.reshape(-1).to(device=dev, dtype=torch.float32)[pair].view(torch.int32)
        # One int64 record per pair: (row within the block sent to its rank, local slot, weight's bits).
        records = torch.stack([row_of_pair - row_start[dest], slots - self._slot_start.to(dev)[dest],
                               weight_bits.to(torch.int64)], dim=1).contiguous()
        yield
        work.wait()
        send_rows, send_pairs = send_counts_t[:, 0].tolist(), send_counts_t[:, 1].tolist()
        recv_rows, recv_pairs = recv_counts_t[:, 0].tolist(), recv_counts_t[:, 1].tolist()
        recv_x = x.new_empty(sum(recv_rows), x.shape[1])
        recv_records = torch.empty(sum(recv_pairs), 3, dtype=torch.int64, device=dev)
        works = [dist.all_to_all_single(recv_x, send_x, recv_rows, send_rows, group=self.group, async_op=True),
                 dist.all_to_all_single(recv_records, records, recv_pairs, send_pairs, group=self.group,
                                        async_op=True)]
        yield
        for w in works:
            w.wait()
        src = torch.repeat_interleave(torch.arange(ep, device=dev), torch.tensor(recv_pairs, device=dev))
        recv_start = torch.tensor([sum(recv_rows[:r]) for r in range(ep)], dtype=torch.int64, device=dev)
        row = recv_records[:, 0] + recv_start[src]
        weight = recv_records[:, 2].to(torch.int32).view(torch.float32)
        handle = _A2AHandle(row_token, row, weight, recv_x.shape[0], send_rows, recv_rows, n_tok, x.dtype)
        return Received(recv_x.index_select(0, row), slots=recv_records[:, 1].contiguous()), handle

    def combine_stages(self, y: torch.Tensor, handle: _A2AHandle) -> Stages[torch.Tensor]:
        # Each received row's pairs summed here (float32), so one row per token and rank goes back.
        partial = torch.zeros(handle.num_recv_rows, y.shape[1], dtype=torch.float32, device=y.device)
        partial.index_add_(0, handle.row_of_pair, y.float() * handle.weight_of_pair[:, None])
        send = partial.to(handle.dtype)
        back = send.new_empty(sum(handle.send_rows), y.shape[1])
        work = dist.all_to_all_single(back, send, handle.send_rows, handle.recv_rows, group=self.group,
                                      async_op=True)
        yield
        work.wait()
        out = torch.zeros(handle.num_tokens, y.shape[1], dtype=torch.float32, device=y.device)
        out.index_add_(0, handle.row_token, back.float())
        return out.to(handle.dtype)


def make_dispatcher(name: str, group: dist.ProcessGroup | None, placement: ExpertPlacement, **options: Any
                    ) -> Dispatcher:
    """The dispatcher backend `name` (registered in `moemesh.ep.backends`) for `group` (None: the default
    group). Fails now if it cannot run."""
    return DISPATCHERS.load(name)(group, placement, **options)
