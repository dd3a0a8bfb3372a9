"""The grouped expert GEMM of an EP rank from torch itself: `torch._grouped_mm`, with nothing to build or install.

Legend: S local slots (the groups), N rows received, C rows per slot in the masked layout, D hidden,
I expert intermediate size.

On a Hopper (sm90) or Blackwell (sm100) GPU, in bf16, torch runs each projection over all slots as one CUTLASS grouped
GEMM that reads the group offsets on the device. Anywhere else torch falls back to one mm per group: on
a CPU that is the very mm `TorchGroupedGemm` calls (so the same bits, handy to test with); on other GPUs it is no
better than 'torch', so it is refused there.
"""

from __future__ import annotations

import itertools

import torch

from moemesh.ep.experts import GroupedGemm
from moemesh.model.layers import silu_and_mul

_INSTEAD = "use grouped GEMM 'torch'"


def _cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of CUDA `device`, None without CUDA (a seam for tests)."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def _runs(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a tiny `torch._grouped_mm` fails on `device` in `dtype`, None if it runs (torch 2.8 has no CPU kernel)."""
    n = 16 // dtype.itemsize
    a, b = torch.zeros(1, n, dtype=dtype, device=device), torch.zeros(1, n, n, dtype=dtype, device=device)
    try:
        torch._grouped_mm(a, b, offs=torch.ones(1, dtype=torch.int32, device=device))
    except (RuntimeError, NotImplementedError) as e:
        return f"fails on {device} in {dtype} in torch {torch.__version__}: {str(e).splitlines()[0]}"
    return None


def unsupported(device: torch.device, dtype: torch.dtype, hidden: int, intermediate: int) -> str | None:
    """Why this backend cannot run experts of hidden D and intermediate I here, None if it can."""
    if device.type == "cuda":
        capability = _cuda_capability(device)
        if capability is None or capability[0] not in (9, 10):
            # Other GPUs get torch's one-mm-per-group fallback, a host sync per call: no better than 'torch'.
            return f"needs a Hopper (sm90) or Blackwell (sm100) GPU, found {capability or 'no CUDA device'}"
        if dtype != torch.bfloat16:
            return f"runs only bfloat16 on a GPU (torch's grouped kernel), got {dtype}"
    elif device.type != "cpu":
        return f"runs on a CPU or a CUDA GPU, got device {device}"
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"takes bfloat16, float16 or float32, got {dtype}"
    # torch._grouped_mm wants every row of every operand 16-byte aligned (TMA on the GPU; it checks on the CPU too).
    align = 16 // dtype.itemsize
    if hidden % align or intermediate % align:
        return (f"needs hidden D and intermediate I to be multiples of {align} in {dtype} (16-byte rows), "
                f"got D={hidden}, I={intermediate}")
    return _runs(device, dtype)


class TorchGroupedMmGemm(GroupedGemm):
    """`torch._grouped_mm` over all slots at once, two calls per layout, on transposed views of the weights.

    Fails at construction on a torch without `torch._grouped_mm` (before 2.8), and in `prepare` on a device, dtype or
    shape it cannot run (`unsupported`).
    """

    def __init__(self) -> None:
        if not callable(getattr(torch, "_grouped_mm", None)):
            raise RuntimeError(f"grouped GEMM 'grouped_mm' needs torch._grouped_mm (torch >= 2.8), this is torch "
                               f"{torch.__version__}; {_INSTEAD}")

    def prepare(self, w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w13 [S, 2I, D], w2 [S, D, I] -> (w13 as [S, D, 2I], w2 as [S, I, D]): views of the same memory.

        Views, not copies: the op reads K-major weights as they are, a copy would double the layer's weight memory,
        and on a CPU each group's mm is then exactly TorchGroupedGemm's `x @ w.t()`.
        """
        s, two_i, d = w13.shape
        if w2.shape != (s, d, two_i // 2) or w2.dtype != w13.dtype or w2.device != w13.device:
            raise ValueError(f"w2 must be [S, D, I] = {[s, d, two_i // 2]} in {w13.dtype} on {w13.device}, got "
                             f"{list(w2.shape)} in {w2.dtype} on {w2.device}")
        why_not = unsupported(w13.device, w13.dtype, d, two_i // 2)
        if why_not:
            raise ValueError(f"grouped GEMM 'grouped_mm' {why_not}; {_INSTEAD}")
        return w13.contiguous().transpose(1, 2), w2.contiguous().transpose(1, 2)

    def contiguous(self, xs: torch.Tensor, counts: list[int], weights: tuple[torch.Tensor, torch.Tensor]
                   ) -> torch.Tensor:
        """xs [N, D] sorted by slot, counts [S] rows per slot -> [N, D] in xs' dtype."""
        w13, w2 = weights
        ends = list(itertools.accumulate(counts))
        if len(counts) != w13.shape[0] or (ends[-1] if ends else 0) != xs.shape[0]:
            # torch would leave rows past the last end unwritten, or fail deep inside on a wrong number of groups.
            raise ValueError(f"counts must give the rows of each of the {w13.shape[0]} slots, summing to the "
                             f"{xs.shape[0]} rows of xs; got {counts}")
        if xs.shape[0] == 0:
            return xs.new_empty(xs.shape)
        # offs: int32 cumulative row ends; an empty slot repeats the previous end and is skipped.
        offs = torch.tensor(ends, dtype=torch.int32, device=xs.device)
        h = torch._grouped_mm(xs, w13, offs=offs)  # [N, 2I]
        return torch._grouped_mm(silu_and_mul(h), w2, offs=offs)

    def masked(self, xs: torch.Tensor, counts: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor]
               ) -> torch.Tensor:
        """xs [S, C, D], counts [S] valid rows per slot -> [S, C, D] (rows past a count are garbage).

        The batched 3D form computes all C rows of every slot: no offsets, so no host sync, and counts go unread.
        """
        w13, w2 = weights
        if xs.shape[0] == 0 or xs.shape[1] == 0:
            return xs.new_empty(xs.shape)
        h = torch._grouped_mm(xs, w13)  # [S, C, 2I]
        return torch._grouped_mm(silu_and_mul(h), w2)
