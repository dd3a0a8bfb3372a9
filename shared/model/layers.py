"""Small building blocks of the DeepSeek decoder: a linear layer, RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """`nn.Linear` whose matmul a runtime may replace with a faster kernel of the same math (e.g. weights
    prepacked for the CPU's matrix units, `moemesh.kernels`); `weight` stays the parameter of record."""

    kernel: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        return F.linear(x, self.weight, self.bias) if self.kernel is None else self.kernel(x)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as the reference does, returned in the input dtype. A runtime may
    install a `kernel` of the same math (`moemesh.kernels`), which returns None for inputs it leaves to this."""

    kernel: Callable[[torch.Tensor], torch.Tensor | None] | None = None

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D], same dtype."""
        if self.kernel is not None and (out := self.kernel(x)) is not None:
            return out
        # One fused op instead of five: decode at small batch is bound by per-op overhead.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class GatedMLP(nn.Module):
    """SwiGLU MLP with the gate and up projections fused into one matrix (`gate_up`, [2I, D])."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up = Linear(hidden, 2 * intermediate, bias=False)
        self.down = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D]."""
        return self.down(silu_and_mul(self.gate_up(x)))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate first, then up) -> silu(gate) * up, [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
