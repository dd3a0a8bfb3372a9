"""Routed-token counts per (MoE layer, expert), taken from outside the model, and EP load balancedness.

The model knows nothing of serving: the engine attaches an `ExpertLoadRecorder`, which puts a forward
hook on every `Router` module. The hook adds the router's top-k ids into a [L, E] int64 counter on the
model's device (one `index_add_` per MoE layer per forward, no host sync); the engine thread copies
the counters to the host at most once per `readout_interval_s` (and when it goes idle), and metrics
read that copy.

Legend: L MoE layers, E routed experts, R (virtual) EP ranks, T tokens, K experts per token.
"""

from __future__ import annotations

import re
import time

import torch
from torch import nn

from moemesh.model.moe import Router

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def balancedness(counts: torch.Tensor, ep_size: int = 1) -> torch.Tensor:
    """counts [L, E] tokens per expert -> [L] float: mean over max tokens per EP rank, 1.0 when even.

    Experts are spread over `ep_size` ranks in contiguous blocks (rank r holds experts
    [r * E / R, (r + 1) * E / R), the first E % R ranks one more), as an EP group places them before
    any rebalancing. A layer that saw no token counts as balanced (1.0).
    """
    num_experts = counts.shape[-1]
    if not 1 <= ep_size <= num_experts:
        raise ValueError(f"ep_size must be in [1, {num_experts}] (the number of experts), got {ep_size}")
    per_rank = torch.stack([block.sum(-1) for block in counts.tensor_split(ep_size, dim=-1)], dim=-1).double()
    top = per_rank.amax(-1)  # [L]
    return torch.where(top > 0, per_rank.mean(-1) / top.clamp(min=1), torch.ones_like(top))


class ExpertLoadRecorder:
    """Counts the tokens each MoE layer routes to each expert, by forward hooks on its Router modules.

    `layers` [L] are the decoder layer indices of the MoE layers, in counter row order; `snapshot`
    [L, E] int64 on the host is the latest readout (cumulative since start or `reset`).
    """

    def __init__(self, model: nn.Module, readout_interval_s: float = 1.0) -> None:
        routers = [(name, m) for name, m in model.named_modules() if isinstance(m, Router) and m.num_experts]
        self.layers: list[int] = []
        for i, (name, _) in enumerate(routers):
            m = _LAYER.search(name)
            self.layers.append(int(m.group(1)) if m else i)
        self.num_experts = routers[0][1].num_experts if routers else 0
        device = next(model.parameters()).device
        self.counts = torch.zeros(len(routers), self.num_experts, dtype=torch.int64, device=device)
        self._ones = torch.ones(0, dtype=torch.int64, device=device)
        self.readout_interval_s = readout_interval_s
        self.snapshot = torch.zeros(len(routers), self.num_experts, dtype=torch.int64)
        self._last_readout = 0.0
        self._dirty = False
        self._handles = [m.register_forward_hook(self._hook(row)) for row, (_, m) in enumerate(routers)]

    def _hook(self, row: int):
        counts = self.counts[row]

        def hook(module: nn.Module, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
            ids = output[0].reshape(-1)  # topk_ids [T, K] -> [T*K]
            n = ids.numel()
            if self._ones.numel() < n:
                self._ones = torch.ones(max(n, 2 * self._ones.numel()), dtype=torch.int64, device=ids.device)
            counts.index_add_(0, ids, self._ones[:n])
            self._dirty = True

        return hook

    def maybe_readout(self, force: bool = False) -> None:
        """Copy the counters to `snapshot` when the interval passed (or `force`) and tokens were counted.
        Call on the thread that runs the model (one host sync on a GPU)."""
        if not self._dirty:
            return
        now = time.monotonic()
        if force or now - self._last_readout >= self.readout_interval_s:
            self.snapshot = self.counts.to("cpu", copy=True)
            self._dirty = False
            self._last_readout = now

    def balancedness(self, ep_size: int = 1) -> list[tuple[int, float]]:
        """(layer, balancedness over `ep_size` virtual EP ranks) of the latest readout."""
        if not self.layers:
            return []
        values = balancedness(self.snapshot, ep_size).tolist()
        return list(zip(self.layers, values, strict=True))

    def reset(self) -> None:
        self.counts.zero_()
        self.snapshot.zero_()

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
