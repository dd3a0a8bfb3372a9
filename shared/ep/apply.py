"""Turn a loaded DeepSeek model into one rank of an EP group, in place (the model code is not edited)."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from moemesh.ep.dispatch import make_dispatcher
from moemesh.ep.experts import EPExperts, make_grouped_gemm
from moemesh.ep.placement import ExpertPlacement
from moemesh.model.moe import MoE


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup | None, placement: ExpertPlacement,
                          dispatcher: str = "all_to_all", gemm: str = "torch",
                          dispatcher_options: dict[str, Any] | None = None) -> nn.Module:
    """Replace each MoE layer's `mlp.experts` by an `EPExperts` holding this rank's slots; returns `model`.

    `group` None is the default process group. Backends are built first, so a missing one fails here.
    """
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if len(moes) != placement.num_layers:
        raise ValueError(f"placement has {placement.num_layers} MoE layers, the model has {len(moes)}")
    disp = make_dispatcher(dispatcher, group, placement, **(dispatcher_options or {}))
    kernel = make_grouped_gemm(gemm)
    for layer, moe in enumerate(moes):
        moe.experts = EPExperts(moe.experts, layer, placement, disp, kernel)
    return model
