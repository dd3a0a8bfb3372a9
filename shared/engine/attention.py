"""Attention over the paged latent KV cache for one engine step.

Legend: B sequences in the step, T new tokens (flattened), N a sequence's KV length (cached + new),
H heads, C kv_lora_rank, R rope dim, V v_head_dim.

Sequences with one new token (decode) attend in the absorbed form, in the latent space, batched;
sequences with several (prefill chunks) expand their latents to per-head keys and values (naive form),
which is cheaper when many queries share the keys. Both read the same cache, so a request can move
between them freely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moemesh.engine.kv_cache import LatentKVCache
from moemesh.kernels.backends import DecodeKernel, DecodeOnlyStep
from moemesh.model.mla import MLAttention, causal_attention


@dataclass
class StepLayout:
    """Where each sequence's tokens sit in the flat batch and in the cache; built once per step.

    slot_mapping [T] int64: cache slot of every new token.
    prefill: per multi-token sequence, (token slice in the batch, KV slots [N] int64 or None when the
      sequence has no cached prefix and attends only to its new tokens).
    decode_rows [Bd] int64: batch rows of the single-token sequences; decode_pages [Bd, Pmax] int64 (their
      page tables, padded), decode_lens [Bd] int64 (their KV lengths, new token included) and decode_mask
      [Bd, Pmax * page_size] bool (True where a token is real).
    """

    slot_mapping: torch.Tensor
    prefill: list[tuple[slice, torch.Tensor | None]]
    decode_rows: torch.Tensor | None = None
    decode_pages: torch.Tensor | None = None
    decode_lens: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None


class PagedAttention:
    """The attention backend the model runner hands to the model for one step."""

    def __init__(self, cache: LatentKVCache, layout: StepLayout, decode_kernel: DecodeKernel | None = None) -> None:
        self.cache = cache
        self.layout = layout
        self.decode_kernel = decode_kernel
        self._decode_bias: torch.Tensor | None = None

    def decode_only(self, layer_idx: int) -> DecodeOnlyStep | None:
        """Layer `layer_idx`'s cache and this step's layout, for a kernel that runs a whole layer's attention: only
        for a step in which every sequence decodes and a decode kernel serves (None otherwise)."""
        lay = self.layout
        if self.decode_kernel is None or lay.decode_rows is None or lay.prefill:
            return None
        return DecodeOnlyStep(self.cache.data[layer_idx], lay.slot_mapping, lay.decode_pages, lay.decode_lens,
                              self.cache.page_size)

    def attend(self, layer: MLAttention, q_nope: torch.Tensor, q_pe: torch.Tensor,
               c_kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """q_nope [T, H, Dn], q_pe [T, H, R], c_kv [T, C], k_pe [T, R] -> [T, H, V]."""
        lay, li = self.layout, layer.layer_idx
        self.cache.write(li, lay.slot_mapping, c_kv, k_pe)
        if lay.decode_rows is not None and not lay.prefill:  # every row decodes, in order: no gather or scatter
            return self._decode(layer, q_nope, q_pe)
        out = q_nope.new_empty(q_nope.shape[0], layer.num_heads, layer.v_dim)
        for rows, kv_slots in lay.prefill:
            if kv_slots is None:
                out[rows] = causal_attention(layer, q_nope[rows], q_pe[rows], c_kv[rows], k_pe[rows])
            else:
                kv = self.cache.read(li, kv_slots)
                c, kp = kv.split([layer.kv_lora_rank, layer.rope_dim], dim=-1)
                out[rows] = causal_attention(layer, q_nope[rows], q_pe[rows], c.to(q_nope.dtype), kp.to(q_nope.dtype))
        if lay.decode_rows is not None:
            r = lay.decode_rows
            out[r] = self._decode(layer, q_nope[r], q_pe[r])
        return out

    def _decode(self, layer: MLAttention, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """Absorbed MLA for Bd single-token queries: q_nope [Bd, H, Dn], q_pe [Bd, H, R] -> [Bd, H, V].

        Both products keep the gathered cache rows [Bd, N, C + R] as they lie (keys times queries, then the
        probabilities' transpose times the same rows, dropping the rope columns after): a transposed or sliced
        view of them would make the batched matmul copy N rows per layer. A kernel set's decode kernel takes the
        step first where it can.
        """
        if self.decode_kernel is not None:
            lay = self.layout
            out = self.decode_kernel(layer, q_nope, q_pe, self.cache.data[layer.layer_idx], lay.decode_pages,
                                     lay.decode_lens, self.cache.page_size)
            if out is not None:
                return out
        kv = self.cache.read_pages(layer.layer_idx, self.layout.decode_pages).to(q_nope.dtype)  # [Bd, N, C + R]
        q = torch.cat((layer.absorb_q(q_nope), q_pe), dim=-1)  # [Bd, H, C + R]
        scores = torch.bmm(kv, q.transpose(1, 2))  # [Bd, N, H]
        if self._decode_bias is None:
            mask = self.layout.decode_mask
            self._decode_bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device
                                            ).masked_fill_(~mask, float("-inf"))[:, :, None]  # [Bd, N, 1]
        probs = torch.softmax(scores.float() * layer.softmax_scale + self._decode_bias, dim=1).to(kv.dtype)
        o_latent = torch.bmm(probs.transpose(1, 2), kv)[..., : layer.kv_lora_rank]  # [Bd, H, C]
        return layer.values_from_latent(o_latent)
