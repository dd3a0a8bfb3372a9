"""The checkpoint's tensor names and shapes, and where each lands in the model's parameters.

Checkpoints on disk name every expert's matrices separately (`mlp.experts.7.gate_proj.weight`) and
keep gate and up projections apart; the model stacks experts (`w13` [E, 2I, D], `w2` [E, D, I]) and
fuses gate with up (`gate_up` [2I, D]) so that each is one matmul.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moemesh.model.config import ModelConfig

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_GATED = re.compile(r"^(.*\.mlp(?:\.shared_experts)?)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: `param[expert][half]`, each index optional.

    `half` 0 is the first (gate) half of a fused `gate_up`/`w13` matrix's rows, 1 the second (up) half.
    """

    param: str
    expert: int | None = None
    half: int | None = None


def target_of(name: str) -> Target:
    """Map a checkpoint tensor name to the model parameter it fills."""
    m = _EXPERT.match(name)
    if m:
        prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
        if proj == "down_proj":
            return Target(f"{prefix}.w2", expert=e)
        return Target(f"{prefix}.w13", expert=e, half=0 if proj == "gate_proj" else 1)
    m = _GATED.match(name)
    if m:
        prefix, proj = m.group(1), m.group(2)
        if proj == "down_proj":
            return Target(f"{prefix}.down.weight")
        return Target(f"{prefix}.gate_up.weight", half=0 if proj == "gate_proj" else 1)
    return Target(name)


def expert_of(name: str) -> tuple[int, int] | None:
    """(decoder layer, routed expert) of a routed expert's tensor, None for any other tensor."""
    m = _EXPERT.match(name)
    if m is None:
        return None
    return layer_of(name), int(m.group(2))


def layer_of(name: str) -> int | None:
    """The decoder layer index a tensor belongs to, or None for embedding, norm and head."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of this config holds, by name, with its shape."""
    d, h, v = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (v, d)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
        a = p + "self_attn."
        if cfg.q_lora_rank is None:
            out[a + "q_proj.weight"] = (h * cfg.qk_head_dim, d)
        else:
            out[a + "q_a_proj.weight"] = (cfg.q_lora_rank, d)
            out[a + "q_a_layernorm.weight"] = (cfg.q_lora_rank,)
            out[a + "q_b_proj.weight"] = (h * cfg.qk_head_dim, cfg.q_lora_rank)
        out[a + "kv_a_proj_with_mqa.weight"] = (cfg.kv_cache_dim, d)
        out[a + "kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
        out[a + "kv_b_proj.weight"] = (h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        out[a + "o_proj.weight"] = (d, h * cfg.v_head_dim)
        if cfg.attention_bias:
            if cfg.q_lora_rank is not None:
                out[a + "q_a_proj.bias"] = (cfg.q_lora_rank,)
            out[a + "kv_a_proj_with_mqa.bias"] = (cfg.kv_cache_dim,)
            out[a + "o_proj.bias"] = (d,)
        m = p + "mlp."
        if not cfg.is_moe_layer(i):
            _gated(out, m, d, cfg.intermediate_size)
            continue
        e, mi = cfg.n_routed_experts or 0, cfg.moe_intermediate_size
        out[m + "gate.weight"] = (e, d)
        if cfg.topk_method == "noaux_tc":
            out[m + "gate.e_score_correction_bias"] = (e,)
        for j in range(e):
            _gated(out, f"{m}experts.{j}.", d, mi)
        if cfg.n_shared_experts:
            _gated(out, m + "shared_experts.", d, mi * cfg.n_shared_experts)
    return out


def _gated(out: dict[str, tuple[int, ...]], prefix: str, d: int, inter: int) -> None:
    out[prefix + "gate_proj.weight"] = (inter, d)
    out[prefix + "up_proj.weight"] = (inter, d)
    out[prefix + "down_proj.weight"] = (d, inter)
