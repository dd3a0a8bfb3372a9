"""Two-batch overlap: run a step as two micro-batches, one computing while the other's dispatch/combine is in
flight.

Each micro-batch's forward is a stage generator over the model's layers that yields wherever its MoE
communication is in flight (see `shared/ep/dispatch.py`); the two generators are resumed in turn, so the
order of collectives is the same on every rank as long as every rank runs two micro-batches (empty ones
included). The math is the model's own: a layer runs through the stages `DecoderLayer.forward` and
`MoE.forward` are made of (`attention`, `before_experts`, the routed experts, `after_experts`, `add_mlp`),
only the routed experts' dispatch and combine are suspended. Split or not, a token's hidden states go
through the same functions.

Legend: T tokens of a micro-batch, D hidden.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moemesh.ep.dispatch import Stages
from moemesh.ep.experts import EPExperts
from moemesh.model.mla import AttentionBackend
from moemesh.model.moe import MoE

MicroBatch = tuple[torch.Tensor, torch.Tensor, AttentionBackend]  # input_ids [T] int64, positions [T], backend


def split_point(num_tokens: Sequence[int]) -> int:
    """Where to cut a batch of sequences with these token counts: the sequence boundary k (1 <= k < len)
    that brings the first part closest to half the tokens (decode: half the sequences). Needs >= 2 sequences."""
    if len(num_tokens) < 2:
        raise ValueError("two-batch overlap needs at least two sequences to split")
    total, acc, best, best_gap = sum(num_tokens), 0, 1, None
    for k in range(1, len(num_tokens)):
        acc += num_tokens[k - 1]
        gap = abs(2 * acc - total)
        if best_gap is None or gap < best_gap:
            best, best_gap = k, gap
    return best


def two_batch_forward(model: nn.Module, parts: Sequence[MicroBatch]) -> list[torch.Tensor]:
    """Final hidden states [T_i, D] of each micro-batch of a `DeepseekForCausalLM`, computed interleaved."""
    gens = [_forward_stages(model, *p) for p in parts]
    results: list[torch.Tensor | None] = [None] * len(gens)
    live = list(range(len(gens)))
    while live:
        for i in list(live):
            try:
                next(gens[i])
            except StopIteration as done:
                results[i] = done.value
                live.remove(i)
    return results  # type: ignore[return-value]


def _forward_stages(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                    backend: AttentionBackend) -> Stages[torch.Tensor]:
    m = model.model
    x = m.embed_tokens(input_ids)
    for layer in m.layers:
        x, h = layer.attention(x, positions, backend)
        mlp = layer.mlp
        if isinstance(mlp, MoE) and isinstance(mlp.experts, EPExperts):
            topk_ids, topk_weights, shared = mlp.before_experts(h)
            routed = yield from mlp.experts.stages(h, topk_ids, topk_weights)
            out = mlp.after_experts(routed, shared)
        else:
            out = mlp(h)
            yield  # nothing in flight: still a turn for the other micro-batch, so layers alternate
        x = layer.add_mlp(x, out)
    return m.norm(x)
