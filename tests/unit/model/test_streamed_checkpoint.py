"""Checkpoints written tensor by tensor, in shards, with FP8 projections: what `make-tiny --preset v3-layer` uses."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moemesh.model.config import ModelConfig
from moemesh.model.fp8 import dequantize_blocks
from moemesh.model.loader import load_model
from moemesh.model.safetensors_file import SafetensorsFile
from moemesh.model.streamed_checkpoint import write_streamed_checkpoint
from moemesh.model.tiny import tiny_config
from moemesh.model.weights import checkpoint_shapes
from tests.fp8_checkpoint import FP8_SMALL


def test_shards_hold_every_tensor_once_with_fp8_projections(tmp_path: Path) -> None:
    cfg = tiny_config(**FP8_SMALL, torch_dtype="bfloat16")
    path = write_streamed_checkpoint(tmp_path / "ck", cfg, seed=3, shard_bytes=200_000, tokenizer=False)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert sorted(p.name for p in path.glob("*.safetensors")) == shards
    shapes = checkpoint_shapes(ModelConfig.from_dir(path))
    proj = "model.layers.1.mlp.experts.3.down_proj.weight"
    scales = {n for n in index["weight_map"] if n.endswith("_scale_inv")}
    assert set(index["weight_map"]) - scales == set(shapes) and proj + "_scale_inv" in scales
    assert not {"model.embed_tokens.weight_scale_inv", "model.layers.1.mlp.gate.weight_scale_inv"} & scales
    with SafetensorsFile(path / index["weight_map"][proj]) as f:
        q = f.get_tensor(proj)
    with SafetensorsFile(path / index["weight_map"][proj + "_scale_inv"]) as f:
        s = f.get_tensor(proj + "_scale_inv")
    assert q.dtype == torch.float8_e4m3fn and q.shape == shapes[proj] and s.shape == (2, 1)
    kept = load_model(path, "float32")
    experts = kept.model.layers[1].mlp.experts
    assert experts.w13.dtype == torch.float8_e4m3fn
    assert torch.equal(experts.fp8().expert(3, torch.float32)[1], dequantize_blocks(q, s, (128, 128)))
    # Drawn per tensor: the same seed gives the same checkpoint whatever the shard size.
    again = write_streamed_checkpoint(tmp_path / "again", cfg, seed=3, shard_bytes=10**9, tokenizer=False)
    with SafetensorsFile(next(again.glob("*.safetensors"))) as f:
        assert torch.equal(f.get_tensor(proj).view(torch.uint8), q.view(torch.uint8))


def test_the_v3_layer_preset_has_deepseek_v3s_layer_dimensions() -> None:
    cfg = ModelConfig.from_hf_dict(tiny_config("v3-layer", torch_dtype="bfloat16"))
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank) == (7168, 128, 1536, 512)
    assert (cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim) == (64, 128, 128)
    assert (cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok) == (256, 2048, 8)
    assert (cfg.n_group, cfg.topk_group, cfg.n_shared_experts, cfg.intermediate_size) == (8, 4, 1, 18432)
    assert cfg.num_hidden_layers == 2 and cfg.is_moe_layer(1) and not cfg.is_moe_layer(0)
    params = sum(torch.Size(s).numel() for s in checkpoint_shapes(cfg).values())
    assert 11.5e9 < params < 12.5e9  # ~12 GB in FP8
