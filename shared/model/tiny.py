"""The embedded default model: a tiny random DeepSeek-V3 checkpoint in exactly the Hugging Face format.

Its attention shape is the real one (kv_lora_rank 512, qk_rope_head_dim 64: a 576-wide latent) so
other engines' MLA kernels can serve the same files; everything else is scaled down.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moemesh.model.config import ModelConfig
from moemesh.model.tiny_tokenizer import build_tiny_tokenizer
from moemesh.model.weights import checkpoint_shapes

INIT_STD = 0.1

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 8, "q_lora_rank": 64,
        "n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
        "qk_nope_head_dim": 32, "v_head_dim": 32,
    },
    # A config big enough to be compute-bound on a CPU, for benchmarks.
    "bench": {
        "vocab_size": 4096, "hidden_size": 1024, "intermediate_size": 2048, "moe_intermediate_size": 256,
        "num_hidden_layers": 6, "num_attention_heads": 16, "q_lora_rank": 384,
        "n_routed_experts": 32, "num_experts_per_tok": 6, "n_group": 8, "topk_group": 4,
        "qk_nope_head_dim": 64, "v_head_dim": 64,
    },
    # The two shapes moemesh is measured against vLLM on (docs/benchmarks.md): a small one, bound by per-op
    # overhead, and a compute-bound one with DeepSeek-V3's head dimensions, bound by reading expert weights
    # in decode and by matrix work in prefill. Head dims are multiples of 32 for vLLM's CPU MLA kernels.
    "small": {
        "vocab_size": 1024, "hidden_size": 384, "intermediate_size": 1024, "moe_intermediate_size": 192,
        "num_hidden_layers": 6, "num_attention_heads": 6, "q_lora_rank": 192,
        "n_routed_experts": 24, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
        "qk_nope_head_dim": 64, "v_head_dim": 64,
    },
    "compute": {
        "vocab_size": 4096, "hidden_size": 1024, "intermediate_size": 2816, "moe_intermediate_size": 384,
        "num_hidden_layers": 6, "num_attention_heads": 16, "q_lora_rank": 512,
        "n_routed_experts": 64, "num_experts_per_tok": 6, "n_group": 8, "topk_group": 4,
        "qk_nope_head_dim": 128, "v_head_dim": 128,
    },
    # DeepSeek-V3's real layer dimensions, one dense and one MoE layer, a small vocabulary, FP8 blocks as DeepSeek
    # ships them (~12 GB): loading and serving at real scale on a host that cannot hold the whole model.
    "v3-layer": {
        "vocab_size": 2048, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": 2, "num_attention_heads": 128, "q_lora_rank": 1536,
        "n_routed_experts": 256, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
        "qk_nope_head_dim": 128, "v_head_dim": 128,
    },
}
# Presets too large to hold in memory: written tensor by tensor, FP8 (moemesh.model.streamed_checkpoint).
STREAMED = ("v3-layer",)


def tiny_config(preset: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """The `config.json` dict of a preset, with any field overridden (tests vary the architecture)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    cfg: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "num_key_value_heads": PRESETS[preset]["num_attention_heads"],
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "yarn", "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
        },
        "rope_interleave": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "initializer_range": INIT_STD,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "float32",
        "use_cache": True,
        **PRESETS[preset],
    }
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None or k == "q_lora_rank"}


def random_weights(cfg: ModelConfig, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights under the checkpoint's own tensor names, with a spread that makes outputs vary."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in checkpoint_shapes(cfg).items():
        if name.endswith("e_score_correction_bias"):
            # Non-zero so that a model that ignores the bias picks different experts.
            t = (torch.rand(shape, generator=g) - 0.5) * 0.2
        elif name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * INIT_STD
        # Router weights and the bias stay float32 in real checkpoints too.
        keep_fp32 = name.endswith("e_score_correction_bias")
        out[name] = t.to(torch.float32 if keep_fp32 else dtype).contiguous()
    return out


def write_checkpoint(out_dir: str | Path, config: dict[str, Any], seed: int = 0,
                     dtype: torch.dtype = torch.float32, shards: int = 1, tokenizer: bool = True,
                     chat_tokens: bool = False) -> Path:
    """Write config.json, safetensors (one file, or `shards` files with an index) and the tokenizer (with
    DeepSeek's chat tokens, think and tool-call markers, as the last ids of its vocabulary if `chat_tokens`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_hf_dict(config)
    tensors = random_weights(cfg, seed, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}, indent=2) + "\n")
    if shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = list(tensors)
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i::shards]}
            save_file(part, str(out / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    if tokenizer:
        build_tiny_tokenizer(out, vocab_size=config["vocab_size"], chat_tokens=chat_tokens)
    return out


def make_tiny(out_dir: str | Path, seed: int = 0, preset: str = "tiny", dtype: torch.dtype = torch.float32,
              chat_tokens: bool = False) -> Path:
    """Write the embedded default model (or another preset) to `out_dir`, its weights in `dtype` (a STREAMED
    preset: FP8 projections, the rest in `dtype`); `chat_tokens`: a tokenizer with DeepSeek's chat tokens."""
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    if preset in STREAMED:
        if chat_tokens:
            raise ValueError(f"the {preset} preset writes its own tokenizer; chat tokens are for the other presets")
        from moemesh.model.streamed_checkpoint import write_streamed_checkpoint

        return write_streamed_checkpoint(out_dir, tiny_config(preset, torch_dtype=name), seed=seed)
    return write_checkpoint(out_dir, tiny_config(preset, torch_dtype=name), seed=seed, dtype=dtype,
                            chat_tokens=chat_tokens)
