"""The DeepSeek-V2/V3 causal LM over a flat batch of tokens.

Legend: T tokens (all sequences of a batch, flattened), D hidden, V vocabulary.
The model knows nothing of batching policy, caches or parallelism: it takes token ids, their
positions and an attention backend, and returns hidden states; `compute_logits` maps chosen rows to
the vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moemesh.model.config import ModelConfig
from moemesh.model.layers import GatedMLP, Linear, RMSNorm
from moemesh.model.mla import AttentionBackend, MLAttention
from moemesh.model.moe import MoE
from moemesh.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    # A runtime may install a kernel of `attention`'s math (`moemesh.kernels`): (x, positions, backend) -> the pair
    # `attention` returns, or None for steps it leaves to the modules.
    attention_kernel: Callable[[torch.Tensor, torch.Tensor, AttentionBackend],
                               tuple[torch.Tensor, torch.Tensor] | None] | None = None
    # And of the MLP half, (the stream after attention, the MLP's input) -> `add_mlp`'s result, or None.
    mlp_kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, layer_idx, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = (
            MoE(cfg) if cfg.is_moe_layer(layer_idx) else GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(self, x: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        """x [T, D] -> [T, D]."""
        x, h = self.attention(x, positions, backend)
        if self.mlp_kernel is not None and (out := self.mlp_kernel(x, h)) is not None:
            return out
        return self.add_mlp(x, self.mlp(h))

    # The stages of `forward`, for callers that run the MLP apart (two-batch overlap runs an MoE's `before_experts`,
    # routed experts and `after_experts` itself): one definition of the layer's math for every caller.
    def attention(self, x: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] residual stream -> (the stream after attention [T, D], the MLP's input: it normed [T, D])."""
        if self.attention_kernel is not None and (out := self.attention_kernel(x, positions, backend)) is not None:
            return out
        x = x + self.self_attn(self.input_layernorm(x), positions, backend)
        return x, self.post_attention_layernorm(x)

    def add_mlp(self, x: torch.Tensor, mlp_out: torch.Tensor) -> torch.Tensor:
        """x [T, D] the stream after attention, mlp_out [T, D] the MLP's output -> the layer's output [T, D]."""
        return x + mlp_out


class DeepseekModel(nn.Module):
    """Embedding, decoder layers and final norm; parameter names follow the checkpoint's `model.*`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # One rotary table shared by every layer (it only depends on the config).
        rotary = RotaryEmbedding(cfg.rope, cfg.qk_rope_head_dim, cfg.max_position_embeddings, cfg.rope_interleave)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, rotary) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        """input_ids [T] int64, positions [T] int64 -> final hidden states [T, D]."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions, backend)
        return self.norm(x)


class DeepseekForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DeepseekModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        """input_ids [T] int64, positions [T] int64 -> hidden states [T, D]."""
        return self.model(input_ids, positions, backend)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] -> logits [N, V] float32."""
        return self.lm_head(hidden).float()
