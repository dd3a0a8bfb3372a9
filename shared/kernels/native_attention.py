"""Absorbed MLA decode over the paged latent cache in one native call per layer (`mla_bf16.c`).

The torch form gathers each sequence's pages into a new tensor and runs four bf16 batched matmuls, a mask, a
softmax and the casts between them per layer; on a CPU each batched matmul re-lays out its operand, so at decode
sizes the calls' set-up costs more than the math (measured on the small benchmark shape, batch 4 at ~150 tokens:
~400 us a layer against ~100 us here; 2x at the compute shape's batch 16 x 300). The kernel reads the cache rows
where they lie and keeps scores and probabilities in float32.
"""

from __future__ import annotations

import ctypes

import torch

from moemesh.kernels import native
from moemesh.model.mla import MLAttention


class NativePagedDecode:
    """A decode-attention kernel for `moemesh.engine.attention.PagedAttention`: bf16 queries, weights and cache
    on the CPU; anything else returns None and keeps the torch form."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib

    def __call__(self, layer: MLAttention, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                 pages: torch.Tensor, lens: torch.Tensor, page_size: int) -> torch.Tensor | None:
        """q_nope [B, H, Dn], q_pe [B, H, R] (roped); cache [S, C + R], one layer's slots; pages [B, P] int64;
        lens [B] int64 (KV length with the new token) -> [B, H, V] bf16, or None where it cannot run."""
        w = layer.kv_b_proj.weight
        bf16 = torch.bfloat16
        if not (q_nope.dtype == q_pe.dtype == cache.dtype == w.dtype == bf16 and cache.device.type == "cpu"
                and w.device.type == "cpu" and cache.is_contiguous() and w.is_contiguous()):
            return None
        kv_b = w.detach().view(layer.num_heads, layer.nope_dim + layer.v_dim, layer.kv_lora_rank)
        return native.mla_decode(self.lib, q_nope, q_pe, kv_b, cache, pages, lens, page_size, layer.softmax_scale)


def paged_decode() -> NativePagedDecode | None:
    """The native decode-attention kernel where it builds and runs here, else None."""
    lib = native.library()
    return None if lib is None else NativePagedDecode(lib)
