"""The paged latent KV cache: per layer, per token, only `c_kv` (kv_lora_rank) and roped `k_pe` (rope dim).

Legend: L layers, S slots (num_pages * page_size), C kv_lora_rank, R qk_rope_head_dim.
A slot is one token's row: slot = page * page_size + offset. Which pages a request owns is the
scheduler's business (page_pool, radix_cache); this module only holds the tensors.
"""

from __future__ import annotations

import torch

from moemesh.model.config import ModelConfig


class LatentKVCache:
    """`data` [L, S, C + R] in the compute dtype; row layout `c_kv` then `k_pe`."""

    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.kv_lora_rank = cfg.kv_lora_rank
        self.data = torch.zeros(cfg.num_hidden_layers, num_pages * page_size, cfg.kv_cache_dim,
                                dtype=dtype, device=device)
        self._page_offsets = torch.arange(page_size, device=device)

    @staticmethod
    def bytes_per_page(cfg: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
        """Memory one page takes across all layers."""
        return cfg.num_hidden_layers * page_size * cfg.kv_cache_dim * torch.empty((), dtype=dtype).element_size()

    def slots(self, pages: list[int], start: int, end: int) -> torch.Tensor:
        """Cache slots of tokens [start, end) of a request whose page table is `pages`: [end - start] int64."""
        p = torch.tensor(pages[: -(-end // self.page_size)], dtype=torch.int64, device=self.data.device)
        return (p[:, None] * self.page_size + self._page_offsets).reshape(-1)[start:end]

    def write(self, layer: int, slots: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Store the latents of T tokens: slots [T] int64, c_kv [T, C], k_pe [T, R]."""
        self.data[layer, slots] = torch.cat((c_kv, k_pe), dim=-1).to(self.data.dtype)

    def read(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """Gather latents at slots (any shape [...]) -> [..., C + R]."""
        flat = self.data[layer].index_select(0, slots.reshape(-1))  # faster than advanced indexing on CPU
        return flat.view(*slots.shape, flat.shape[-1])

    def read_pages(self, layer: int, pages: torch.Tensor) -> torch.Tensor:
        """Gather whole pages: pages [B, P] int64 -> [B, P * page_size, C + R].

        Copying page-sized runs is about twice as fast on CPU as gathering the same rows one by one.
        """
        paged = self.data[layer].view(self.num_pages, self.page_size, -1)
        flat = paged.index_select(0, pages.reshape(-1))
        return flat.view(pages.shape[0], pages.shape[1] * self.page_size, flat.shape[-1])

    def page_view(self, layer: int, page: int) -> torch.Tensor:
        """One page of one layer, [page_size, C + R] (a view: writes land in the cache)."""
        start = page * self.page_size
        return self.data[layer, start:start + self.page_size]
