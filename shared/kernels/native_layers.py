"""Native kernels for the model's small layers at bf16 (`norm_bf16.c`): RMSNorm in one call.

The torch form of a bf16 RMSNorm is five ops (to float32, the fused norm, back to bf16, the weight's product) at
12-25 us a call on this machine at decode sizes; the native call takes 5-10 us, most of it the call itself, and
computes the same bits (the normalisation in float32, rounded to bf16 before the product, as the reference).
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from moemesh.kernels import native
from moemesh.model.layers import RMSNorm


class NativeRMSNorm:
    """An RMSNorm's kernel: bf16 rows on the CPU natively, anything else in the module's torch form."""

    def __init__(self, lib: ctypes.CDLL, norm: RMSNorm) -> None:
        self.lib = lib
        self.norm = norm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D], same dtype."""
        w = self.norm.weight
        if x.dtype == w.dtype == torch.bfloat16 and x.device.type == w.device.type == "cpu" and w.is_contiguous():
            return native.rms_norm(self.lib, x, w.detach(), self.norm.eps)
        return w * F.rms_norm(x.float(), (x.shape[-1],), eps=self.norm.eps).to(x.dtype)
