"""The absorbed-MLA weights the decode path caches follow every write to kv_b_proj."""

from __future__ import annotations

import torch

from moemesh.model.config import ModelConfig
from moemesh.model.mla import MLAttention
from moemesh.model.rope import RotaryEmbedding
from moemesh.model.tiny import tiny_config


def _layer() -> MLAttention:
    cfg = ModelConfig.from_hf_dict(tiny_config("tiny"))
    rotary = RotaryEmbedding(cfg.rope, cfg.qk_rope_head_dim, cfg.max_position_embeddings, cfg.rope_interleave)
    layer = MLAttention(cfg, 0, rotary)
    torch.nn.init.normal_(layer.kv_b_proj.weight, std=0.05, generator=torch.Generator().manual_seed(0))
    return layer


def _absorb_reference(layer: MLAttention, q_nope: torch.Tensor) -> torch.Tensor:
    w_uk = layer.kv_b_proj.weight.view(layer.num_heads, layer.nope_dim + layer.v_dim, -1)[:, : layer.nope_dim]
    return torch.einsum("thd,hdc->thc", q_nope, w_uk)


def test_absorbed_weights_follow_in_place_writes_and_replacement() -> None:
    layer = _layer()
    q = torch.randn(3, layer.num_heads, layer.nope_dim, generator=torch.Generator().manual_seed(1))
    o = torch.randn(3, layer.num_heads, layer.kv_lora_rank, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        torch.testing.assert_close(layer.absorb_q(q), _absorb_reference(layer, q))
        before = layer.values_from_latent(o)
        layer.kv_b_proj.weight.mul_(2.0)  # a loader or a weight update writing in place
        torch.testing.assert_close(layer.absorb_q(q), _absorb_reference(layer, q))
        torch.testing.assert_close(layer.values_from_latent(o), 2 * before)
    layer.kv_b_proj.weight = torch.nn.Parameter(torch.zeros_like(layer.kv_b_proj.weight))  # replaced outright
    with torch.inference_mode():
        assert layer.absorb_q(q).abs().max() == 0 and layer.values_from_latent(o).abs().max() == 0
