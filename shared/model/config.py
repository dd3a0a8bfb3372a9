"""The DeepSeek-V2/V3 architecture, read from a Hugging Face `config.json`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
SUPPORTED_ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")


class ModelConfigError(ValueError):
    """The checkpoint's config is missing, malformed or describes an architecture moemesh does not serve."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of the `qk_rope_head_dim` part of each head, with optional YaRN scaling."""

    theta: float = 10000.0
    rope_type: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "yarn"):
            raise ModelConfigError(f"rope type {self.rope_type!r} is not supported (supported: default, yarn)")

    @property
    def softmax_mscale(self) -> float:
        """The factor YaRN multiplies into the attention softmax scale (squared by the caller)."""
        if self.rope_type == "yarn" and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale_all_dim)
        return 1.0

    @property
    def cos_sin_scale(self) -> float:
        """YaRN's factor on cos/sin; DeepSeek sets mscale == mscale_all_dim, which makes it 1."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction for a context extension of `scale`."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Everything about the network's shape the model, the engine and the services need.

    Built from a Hugging Face `config.json` by `ModelConfig.from_hf_dict`; the field names are those
    of the checkpoint so that a reader of either recognises them.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    moe_intermediate_size: int
    n_routed_experts: int | None
    n_shared_experts: int | None
    num_experts_per_tok: int | None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"
    quant_block_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"model_type {self.model_type!r} is not supported; moemesh serves "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} ({', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise ModelConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            raise ModelConfigError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.hidden_act != "silu":
            raise ModelConfigError(f"hidden_act {self.hidden_act!r} is not supported (supported: silu)")
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ModelConfigError(f"scoring_func {self.scoring_func!r} is not supported (softmax, sigmoid)")
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ModelConfigError(
                f"topk_method {self.topk_method!r} is not supported (greedy, group_limited_greedy, noaux_tc)")
        if self.num_moe_layers:
            e, k = self.n_routed_experts or 0, self.num_experts_per_tok or 0
            if not 0 < k <= e:
                raise ModelConfigError(f"num_experts_per_tok ({k}) must be in 1..n_routed_experts ({e})")
            if self.topk_method != "greedy":
                g, tg = self.n_group or 0, self.topk_group or 0
                if g <= 0 or e % g or not 0 < tg <= g:
                    raise ModelConfigError(
                        f"{self.topk_method} needs n_group dividing n_routed_experts ({e}) and "
                        f"0 < topk_group <= n_group; got n_group={self.n_group}, topk_group={self.topk_group}")
                if tg * (e // g) < k:
                    raise ModelConfigError("topk_group groups hold fewer experts than num_experts_per_tok")

    # Derived shapes, named as the checkpoint and the reference name them.
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Width of one token's cached latent per layer: `c_kv` then the roped `k_pe`."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """The attention scale as the reference computes it, YaRN's mscale squared included."""
        m = self.rope.softmax_mscale
        return self.qk_head_dim ** -0.5 * m * m

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has routed experts (DeepSeek's `first_k_dense_replace`/`moe_layer_freq`)."""
        return (
            bool(self.n_routed_experts)
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % max(self.moe_layer_freq, 1) == 0
        )

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def fingerprint_dict(self) -> dict[str, Any]:
        """The fields that determine the network's shape and numerics, for compatibility checks."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.__dict__ if isinstance(v, RopeConfig) else v
        return out

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face DeepSeek-V2/V3 `config.json` dict (either rope spelling)."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = raw.get("architectures") or []
            raise ModelConfigError(
                f"unsupported architecture (model_type={model_type!r}, architectures={archs}); "
                f"moemesh serves {', '.join(SUPPORTED_ARCHITECTURES)} "
                f"(model_type {' or '.join(SUPPORTED_MODEL_TYPES)})"
            )
        try:
            return cls._from_hf_dict(raw, model_type)
        except (KeyError, TypeError) as e:
            raise ModelConfigError(f"config.json is missing or has a malformed field: {e}") from None

    @classmethod
    def _from_hf_dict(cls, raw: dict[str, Any], model_type: str) -> ModelConfig:
        v3 = model_type == "deepseek_v3"
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        quant = raw.get("quantization_config") or {}
        block = quant.get("weight_block_size")
        return cls(
            model_type=model_type,
            vocab_size=_int(raw, "vocab_size"),
            hidden_size=_int(raw, "hidden_size"),
            intermediate_size=_int(raw, "intermediate_size"),
            num_hidden_layers=_int(raw, "num_hidden_layers"),
            num_attention_heads=_int(raw, "num_attention_heads"),
            kv_lora_rank=_int(raw, "kv_lora_rank"),
            q_lora_rank=None if raw.get("q_lora_rank") is None else _int(raw, "q_lora_rank"),
            qk_nope_head_dim=_int(raw, "qk_nope_head_dim"),
            qk_rope_head_dim=_int(raw, "qk_rope_head_dim"),
            v_head_dim=_int(raw, "v_head_dim"),
            moe_intermediate_size=_int(raw, "moe_intermediate_size", 0),
            n_routed_experts=raw.get("n_routed_experts"),
            n_shared_experts=raw.get("n_shared_experts"),
            num_experts_per_tok=raw.get("num_experts_per_tok"),
            first_k_dense_replace=_int(raw, "first_k_dense_replace", 0),
            moe_layer_freq=_int(raw, "moe_layer_freq", 1),
            # V3 checkpoints always route with sigmoid + noaux_tc; older V3 configs omit the keys.
            scoring_func=raw.get("scoring_func") or ("sigmoid" if v3 else "softmax"),
            topk_method=raw.get("topk_method") or ("noaux_tc" if v3 else "greedy"),
            n_group=raw.get("n_group"),
            topk_group=raw.get("topk_group"),
            norm_topk_prob=bool(raw.get("norm_topk_prob", v3)),
            routed_scaling_factor=_float(raw, "routed_scaling_factor", 1.0) or 1.0,
            rms_norm_eps=_float(raw, "rms_norm_eps", 1e-6),
            max_position_embeddings=_int(raw, "max_position_embeddings", 4096),
            rope=_rope_from_hf(raw),
            # V2 checkpoints always use the interleaved (complex-pair) rotary layout.
            rope_interleave=bool(raw.get("rope_interleave", True)) if v3 else True,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            hidden_act=raw.get("hidden_act", "silu"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
            quant_block_size=tuple(block) if block else None,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` from a checkpoint folder, with errors that name the file."""
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ModelConfigError(f"{p} not found: a model folder needs a Hugging Face config.json")
        try:
            raw = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelConfigError(f"{p} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ModelConfigError(f"{p} must hold a JSON object")
        try:
            return cls.from_hf_dict(raw)
        except ModelConfigError as e:
            raise ModelConfigError(f"{p}: {e}") from None


def _int(raw: dict[str, Any], key: str, default: int | None = None) -> int:
    """raw[key] as an int (`default` when absent or null); ModelConfigError naming the key and value otherwise."""
    value = raw.get(key)
    if value is None:
        if default is None:
            raise ModelConfigError(f"config.json is missing or has a malformed field: {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelConfigError(f"{key} must be an integer, got {value!r}")
    return value


def _float(raw: dict[str, Any], key: str, default: float) -> float:
    """raw[key] as a float (`default` when absent or null); ModelConfigError naming the key and value otherwise."""
    value = raw.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


def _rope_from_hf(raw: dict[str, Any]) -> RopeConfig:
    """Merge the older `rope_scaling` + `rope_theta` spelling and the newer `rope_parameters` one."""
    params = dict(raw.get("rope_scaling") or {})
    params.update(raw.get("rope_parameters") or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta") or raw.get("rope_theta") or 10000.0)
    if rope_type == "default":
        return RopeConfig(theta=theta)
    max_pos = int(raw.get("max_position_embeddings", 4096))
    orig = int(params.get("original_max_position_embeddings") or max_pos)
    factor = params.get("factor")
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(factor) if factor is not None else max_pos / orig,
        original_max_position_embeddings=orig,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=_opt_float(params.get("mscale")),
        mscale_all_dim=_opt_float(params.get("mscale_all_dim")),
        attention_factor=_opt_float(params.get("attention_factor")),
        truncate=bool(params.get("truncate", True)),
    )


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)
