"""MLA in one native call per layer: absorbed decode over the paged latent cache (`mla_bf16.c`), and the naive form
over a prefill chunk's keys (`mla_prefill_bf16.c`).

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


class NativePrefillAttention:
    """A layer's `MLAttention.prefill_kernel`: kv_b_proj expands the latents (its own kernel: oneDNN's), then one
    native call attends (`mla_prefill_bf16.c`). bf16 on the CPU with even nope and rope dims and a value dim that is
    a multiple of 16; anything else returns None and keeps the torch form.

    Measured on the small benchmark shape (one thread, 128-token prompt): 0.65 ms a sequence and layer with the
    expansion against 1.00 ms for the torch form; the compute shape's 256-token prompt 7.3 against 11.5 ms. Its
    scores and probabilities stay float32 until the weighted sum (the torch form rounds the scores to bf16), so its
    error against a float64 reference is the smaller of the two (tests/unit/kernels/test_native_prefill.py)."""

    def __init__(self, lib: ctypes.CDLL, layer: MLAttention) -> None:
        self.lib = lib
        self.kv_b = layer.kv_b_proj
        self.heads, self.nope, self.rope, self.v_dim = layer.num_heads, layer.nope_dim, layer.rope_dim, layer.v_dim
        self.scale = layer.softmax_scale
        self.fits = self.nope % 2 == 0 and self.rope % 2 == 0 and self.v_dim % 16 == 0 and self.nope + self.rope <= 512

    def __call__(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor
                 ) -> torch.Tensor | None:
        """q_nope [T, H, Dn], q_pe [T, H, R], c_kv [N, C], k_pe [N, R]; the queries are the last T of the N
        positions -> [T, H, V] bf16, or None where it cannot run."""
        bf16 = torch.bfloat16
        if not (self.fits and q_nope.dtype == q_pe.dtype == c_kv.dtype == k_pe.dtype == self.kv_b.weight.dtype == bf16
                and q_nope.device.type == "cpu" and q_nope.stride(-1) == q_pe.stride(-1) == k_pe.stride(-1) == 1
                and 0 < q_nope.shape[0] <= c_kv.shape[0]):
            return None
        n = c_kv.shape[0]
        kv = self.kv_b(c_kv).view(n, self.heads, self.nope + self.v_dim)  # a new contiguous tensor, bf16
        return native.mla_prefill(self.lib, q_nope, q_pe, kv, k_pe, self.v_dim, self.scale)


def paged_decode() -> NativePagedDecode | None:
    """The native decode-attention kernel where it builds and runs here, else None."""
    lib = native.library()
    return None if lib is None else NativePagedDecode(lib)
