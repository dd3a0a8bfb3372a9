"""FP8 block-quantized weights, as DeepSeek-V3 ships them: e4m3 values with one float32 scale per block
(`weight_scale_inv`, 128 x 128 by default), and their conversion to a compute dtype.

Routed experts are most of a DeepSeek model's bytes; kept in 8 bits (`Fp8Experts`) they take half the memory of
bf16, and a grouped GEMM converts one expert at a time when it computes (or, DeepGEMM, consumes them as they are).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_E4M3_MAX = 448.0
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


# Rows converted at a time (a multiple of any block height used): bounds the float32 temporaries of a large matrix.
_CHUNK_ROWS = 1024


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """weight [..., O, I] float8 with scale_inv [..., ceil(O/bo), ceil(I/bi)] float32 -> [..., O, I] in `dtype`.

    Computed in float32 and rounded once to `dtype`, so the result does not depend on where it is done (at load
    or at compute time). A large matrix goes _CHUNK_ROWS rows at a time, so that its float32 temporaries stay
    small (an 18432 x 7168 MLP weight would otherwise need 1 GB of them).
    """
    bo = block[0]
    o = weight.shape[-2]
    if weight.dim() != 2 or o <= _CHUNK_ROWS or _CHUNK_ROWS % bo:
        return _dequantize(weight, scale_inv, block, dtype)
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    for r in range(0, o, _CHUNK_ROWS):
        out[r:r + _CHUNK_ROWS] = _dequantize(weight[r:r + _CHUNK_ROWS],
                                             scale_inv[r // bo:(r + _CHUNK_ROWS) // bo], block, dtype)
    return out


def _dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                dtype: torch.dtype) -> torch.Tensor:
    bo, bi = block
    o, i = weight.shape[-2:]
    lead = weight.shape[:-2]
    if o % bo == 0 and i % bi == 0:  # whole blocks: scaled in place of a full-size scale tensor
        w = weight.float().view(*lead, o // bo, bo, i // bi, bi) * scale_inv.float()[..., :, None, :, None]
        return w.view(*lead, o, i).to(dtype)
    scale = scale_inv.float().repeat_interleave(bo, dim=-2)[..., :o, :].repeat_interleave(bi, dim=-1)[..., :i]
    return (weight.float() * scale).to(dtype)


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [O, I] float -> (e4m3 [O, I], scale_inv [ceil(O/bo), ceil(I/bi)] float32): one scale per block,
    its largest magnitude over e4m3's largest (448), so that `dequantize_blocks` gives the weight back to e4m3's
    precision. Blocks at the edges may overhang the matrix, as in DeepSeek-V3's files."""
    bo, bi = block
    o, i = weight.shape
    so, si = scale_shape(o, i, block)
    padded = torch.nn.functional.pad(weight.float(), (0, si * bi - i, 0, so * bo - o))
    blocks = padded.view(so, bo, si, bi)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / _E4M3_MAX  # [so, si]
    q = (blocks / scale[:, None, :, None]).clamp(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(so * bo, si * bi)[:o, :i].contiguous(), scale


def scale_shape(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """The block-scale grid of a [rows, cols] weight."""
    return -(-rows // block[0]), -(-cols // block[1])


@dataclass
class Fp8Experts:
    """S routed experts in e4m3: w13 [S, 2I, D] (gate rows, then up rows), w2 [S, D, I]; block scales
    w13_scale [S, 2, ceil(I/bo), ceil(D/bi)] (the gate's, then the up projection's: each is its own checkpoint
    matrix), w2_scale [S, ceil(D/bo), ceil(I/bi)], float32."""

    w13: torch.Tensor
    w2: torch.Tensor
    w13_scale: torch.Tensor
    w2_scale: torch.Tensor
    block: tuple[int, int]

    def expert(self, s: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot s converted to `dtype`: (w13 [2I, D], w2 [D, I])."""
        inter = self.w13.shape[1] // 2
        halves = self.w13[s].view(2, inter, -1)
        w13 = torch.cat([dequantize_blocks(halves[h], self.w13_scale[s, h], self.block, dtype) for h in (0, 1)])
        return w13, dequantize_blocks(self.w2[s], self.w2_scale[s], self.block, dtype)

    def select(self, index: torch.Tensor) -> Fp8Experts:
        """The slots `index` [S'] int64 (copies)."""
        return Fp8Experts(self.w13.index_select(0, index), self.w2.index_select(0, index),
                          self.w13_scale.index_select(0, index), self.w2_scale.index_select(0, index), self.block)
