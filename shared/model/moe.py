"""DeepSeek's mixture of experts: the router (softmax or sigmoid scoring, grouped top-k) and the experts.

Legend: T tokens, D hidden, E routed experts, K experts per token, I expert intermediate size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.model.config import ModelConfig
from moemesh.model.fp8 import Fp8Experts, scale_shape
from moemesh.model.layers import GatedMLP, silu_and_mul

# The padded batched-matmul form of the routed experts (see RoutedExperts.forward) serves layers whose experts'
# weights take at most this much memory, in steps where no expert has more tokens than this.
_PADDED_MAX_BYTES = 16 * 2**20
_PADDED_MAX_ROWS = 16


class ExpertsKernel(Protocol):
    """A faster form of `RoutedExperts`' math that a runtime installs (`moemesh.kernels`)."""

    def __call__(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The grouped SwiGLU GEMM: xs [P, D] rows grouped by expert, counts [E] rows per expert -> [P, D]."""
        ...

    def every_expert(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     counts: list[int]) -> torch.Tensor | None:
        """The whole layer in one pass over every expert's weights (x [T, D] -> weighted sum [T, D]), or None
        where the grouped form is cheaper for this step's `counts`."""
        ...


class Router(nn.Module):
    """Chooses K experts per token and their weights, exactly as the checkpoint's routing method says. A runtime
    may install a `kernel` of the same math (`moemesh.kernels`), which returns None for steps it leaves to this."""

    kernel: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None] | None = None

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e = cfg.n_routed_experts or 0
        self.num_experts = e
        self.top_k = cfg.num_experts_per_tok or 0
        self.scoring = cfg.scoring_func
        self.method = cfg.topk_method
        self.n_group = cfg.n_group or 1
        self.topk_group = cfg.topk_group or 1
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        # The router runs in float32 whatever the compute dtype: routing flips are not small errors.
        self.weight = nn.Parameter(torch.zeros(e, cfg.hidden_size, dtype=torch.float32))
        if self.method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(e, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (topk_ids [T, K] int64, topk_weights [T, K] float32)."""
        if self.kernel is not None and (chosen := self.kernel(x)) is not None:
            return chosen
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        if self.method == "greedy":
            weights, ids = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        elif self.method == "group_limited_greedy":
            group_scores = scores.view(-1, self.n_group, self.num_experts // self.n_group).amax(dim=-1)
            masked = scores.masked_fill(~self._group_mask(group_scores), 0.0)
            weights, ids = torch.topk(masked, self.top_k, dim=-1, sorted=False)
        else:  # noaux_tc: the bias steers the choice only; weights come from the unbiased scores
            biased = scores + self.e_score_correction_bias
            group_scores = biased.view(-1, self.n_group, self.num_experts // self.n_group).topk(2, dim=-1)[0].sum(-1)
            masked = biased.masked_fill(~self._group_mask(group_scores), float("-inf"))
            ids = torch.topk(masked, self.top_k, dim=-1, sorted=False)[1]
            weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling

    def _group_mask(self, group_scores: torch.Tensor) -> torch.Tensor:
        """group_scores [T, G] -> bool [T, E], True for experts in the top `topk_group` groups."""
        group_idx = torch.topk(group_scores, self.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        return mask.repeat_interleave(self.num_experts // self.n_group, dim=1)


class RoutedExperts(nn.Module):
    """E SwiGLU experts with stacked weights: `w13` [E, 2I, D] (gate then up), `w2` [E, D, I].

    The forward sorts the (token, expert) pairs by expert and runs the grouped GEMM: plain torch, or a
    `kernel` of the same math a runtime installs (`moemesh.kernels`), taking the rows grouped by expert and
    the rows per expert. Expert parallelism replaces this module's forward.
    """

    kernel: ExpertsKernel | None = None

    def __init__(self, num_experts: int, hidden: int, intermediate: int,
                 logical_ids: list[int] | None = None, fp8_block: tuple[int, int] | None = None) -> None:
        """`logical_ids`: this module holds only some of the layer's experts (a loader chose them for an
        expert-parallel rank), row s being expert logical_ids[s]; its forward is then not the layer's.
        `fp8_block`: the weights stay in e4m3 with float32 block scales of this size (`w13_scale_inv`,
        `w2_scale_inv`, laid out as `Fp8Experts` says), converted one expert at a time when computed."""
        super().__init__()
        self.num_experts = num_experts
        self.logical_ids = logical_ids
        self.fp8_block = fp8_block
        wdtype = torch.float8_e4m3fn if fp8_block else None
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden, dtype=wdtype),
                                requires_grad=fp8_block is None)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate, dtype=wdtype),
                               requires_grad=fp8_block is None)
        if fp8_block:
            self.register_buffer("w13_scale_inv", torch.empty(
                num_experts, 2, *scale_shape(intermediate, hidden, fp8_block), dtype=torch.float32))
            self.register_buffer("w2_scale_inv", torch.empty(
                num_experts, *scale_shape(hidden, intermediate, fp8_block), dtype=torch.float32))

    def fp8(self) -> Fp8Experts | None:
        """The weights as FP8 experts (views), or None when they are not kept in 8 bits."""
        if self.fp8_block is None:
            return None
        return Fp8Experts(self.w13, self.w2, self.w13_scale_inv, self.w2_scale_inv, self.fp8_block)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, D]; topk_ids [T, K] int64; topk_weights [T, K] float32 -> [T, D] in x's dtype."""
        if self.logical_ids is not None:
            raise RuntimeError("these routed experts are one expert-parallel rank's share; EP runs them")
        k = topk_ids.shape[1]
        flat_ids = topk_ids.reshape(-1)
        if self.kernel is not None:
            counts_list = _counts(flat_ids, self.num_experts)
            if (whole := self.kernel.every_expert(x, topk_ids, topk_weights, counts_list)) is not None:
                return whole
        order = torch.argsort(flat_ids, stable=True)
        token_of_pair = order // k
        xs = x.index_select(0, token_of_pair)  # [T*K, D], grouped by expert
        # Measured on CPU, in a model's step (where a layer's weights come from memory, not from cache): an
        # installed kernel (prepacked weights) wins at every size, since a batched matmul re-lays out all
        # experts' weights on every call. Without one, two batched matmuls over every expert padded to the
        # busiest one's rows beat one matmul pair per expert at decode sizes while the weights are small.
        if self.kernel is not None:
            out = self.kernel(xs, counts_list)
        else:
            counts = torch.bincount(flat_ids, minlength=self.num_experts)
            if (self.fp8_block is None and self._weight_bytes() <= _PADDED_MAX_BYTES
                    and (cap := int(counts.max())) <= _PADDED_MAX_ROWS):
                out = self._padded(xs, flat_ids[order], counts, cap)
            else:
                out = self._looped(xs, counts.tolist())
        out.mul_(topk_weights.reshape(-1)[order, None].to(out.dtype))  # in place: out is this call's own
        return torch.zeros_like(x).index_add_(0, token_of_pair, out)

    def _weight_bytes(self) -> int:
        return (self.w13.numel() + self.w2.numel()) * self.w13.element_size()

    def _looped(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """One matmul pair per expert with tokens: xs [P, D] grouped by expert -> [P, D]."""
        out = torch.empty_like(xs)
        fp8 = self.fp8()
        start = 0
        for e, n in enumerate(counts):
            if n:
                seg = xs[start:start + n]
                w13, w2 = (self.w13[e], self.w2[e]) if fp8 is None else fp8.expert(e, xs.dtype)
                out[start:start + n] = silu_and_mul(seg @ w13.t()) @ w2.t()
                start += n
        return out

    def _padded(self, xs: torch.Tensor, expert_of_pair: torch.Tensor, counts: torch.Tensor, cap: int
                ) -> torch.Tensor:
        """Small, even batches (decode): pad every expert's tokens to `cap` rows and run two bmm calls
        instead of 2E small matmuls. xs [P, D] grouped by expert, expert_of_pair [P] sorted -> [P, D]."""
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(xs.shape[0], device=xs.device) - starts[expert_of_pair]
        buf = xs.new_zeros(self.num_experts, cap, xs.shape[1])
        buf[expert_of_pair, slot] = xs
        h = silu_and_mul(torch.bmm(buf, self.w13.transpose(1, 2)))  # [E, cap, I]
        return torch.bmm(h, self.w2.transpose(1, 2))[expert_of_pair, slot]


# Up to this many (token, expert) pairs, counting them in Python beats `bincount` and `tolist` (~40 us at decode
# sizes, the two scans bincount makes for its range among them) by an order of magnitude.
_PY_COUNT_MAX_PAIRS = 256


def _counts(flat_ids: torch.Tensor, num_experts: int) -> list[int]:
    """flat_ids [P] int64 expert ids (on the CPU, or any device) -> the pairs per expert, [E] as a list."""
    if flat_ids.numel() > _PY_COUNT_MAX_PAIRS or flat_ids.device.type != "cpu":
        return torch.bincount(flat_ids, minlength=num_experts).tolist()
    counts = [0] * num_experts
    for e in flat_ids.tolist():
        if not 0 <= e < num_experts:
            raise ValueError(f"expert id {e} outside the layer's {num_experts} experts")
        counts[e] += 1
    return counts


class MoE(nn.Module):
    """Routed experts plus the always-on shared experts of a DeepSeek MoE layer.

    The forward is three stages, each plain math over this layer's tokens: `before_experts` (the router's
    choice and the shared experts), the routed experts (`self.experts`, a module whose forward expert
    parallelism replaces), `after_experts` (their sum). Whoever runs the stages apart (two-batch overlap)
    calls these same methods, so the math has one definition.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts or 0, cfg.hidden_size, cfg.moe_intermediate_size)
        n_shared = cfg.n_shared_experts or 0
        self.shared_experts = (
            GatedMLP(cfg.hidden_size, cfg.moe_intermediate_size * n_shared) if n_shared else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D]."""
        topk_ids, topk_weights, shared = self.before_experts(x)
        return self.after_experts(self.experts(x, topk_ids, topk_weights), shared)

    def before_experts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The token-local work ahead of the routed experts: x [T, D] -> (topk_ids [T, K] int64,
        topk_weights [T, K] float32, the shared experts' output [T, D] in x's dtype, or None without any)."""
        topk_ids, topk_weights = self.gate(x)
        return topk_ids, topk_weights, None if self.shared_experts is None else self.shared_experts(x)

    def after_experts(self, routed: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        """routed [T, D] the routed experts' weighted sum, shared [T, D] or None -> the layer's output [T, D]."""
        return routed if shared is None else routed + shared
