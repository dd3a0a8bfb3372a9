"""Two-batch overlap runs the model's own stages: same logits as the plain forward, the same stage functions in the
same order, and a change planted in any stage shows up in both paths alike.

The routed experts are the real `EPExperts` of a one-rank EP group; only the network is replaced, by a loopback
dispatcher that yields where a real one's collectives are in flight (tests/processes/ep/test_ep_moe.py runs the
real all-to-all over 2 to 4 ranks).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from moemesh.ep.dispatch import Dispatcher, Received, Stages
from moemesh.ep.experts import EPExperts
from moemesh.ep.placement import ExpertPlacement
from moemesh.ep.tbo import two_batch_forward
from moemesh.model.deepseek import DecoderLayer, DeepseekForCausalLM
from moemesh.model.loader import load_model
from moemesh.model.mla import NoCacheAttention
from moemesh.model.moe import MoE

TOL = 1e-5  # as tests/processes/ep/test_ep_moe.py
PROMPTS = ([11, 7, 300], [5, 42, 99, 260, 17])  # different lengths: a trace entry's T names its micro-batch


class LoopbackDispatcher(Dispatcher):
    """The dispatcher of an EP group of one rank, without torch.distributed: every pair stays here.

    Yields once in dispatch and once in combine, where a real dispatcher waits on its all-to-all, so the other
    micro-batch runs there as it would in a group.
    """

    def __init__(self, placement: ExpertPlacement) -> None:  # no super(): there is no process group to ask
        self.group, self.placement, self.rank, self.ep_size = None, placement, 0, 1

    def dispatch_stages(self, x: torch.Tensor, phys_ids: torch.Tensor, weights: torch.Tensor
                        ) -> Stages[tuple[Received, Any]]:
        k = phys_ids.shape[1]
        token = torch.arange(phys_ids.numel()) // k  # [T*K] token of each (token, slot) pair
        yield
        handle = (token, weights.reshape(-1).float(), x.shape[0], x.dtype)
        return Received(x.index_select(0, token), slots=phys_ids.reshape(-1).clone()), handle

    def combine_stages(self, y: torch.Tensor, handle: Any) -> Stages[torch.Tensor]:
        token, weight, num_tokens, dtype = handle
        yield
        out = torch.zeros(num_tokens, y.shape[1], dtype=torch.float32)
        out.index_add_(0, token, y.float() * weight[:, None])
        return out.to(dtype)


def model_of(ckpt: Path, ep: bool) -> DeepseekForCausalLM:
    """The checkpoint's model; `ep`: with `EPExperts` on a one-rank group, two redundant slots (10 for 8 experts)."""
    model = load_model(ckpt, dtype="float32")
    if ep:
        moes = [m for m in model.modules() if isinstance(m, MoE)]
        placement = ExpertPlacement.default(len(moes), moes[0].experts.num_experts, 1, redundant=2)
        disp = LoopbackDispatcher(placement)
        for layer, moe in enumerate(moes):
            moe.experts = EPExperts(moe.experts, layer, placement, disp)
    return model


def plain_logits(model: DeepseekForCausalLM) -> list[torch.Tensor]:
    """[T_i, V] float32 per prompt, each prompt through the plain forward on its own."""
    outs = []
    with torch.no_grad():
        for p in PROMPTS:
            hidden = model(torch.tensor(p), torch.arange(len(p)), NoCacheAttention([len(p)]))
            outs.append(model.compute_logits(hidden))
    return outs


def tbo_logits(model: DeepseekForCausalLM) -> list[torch.Tensor]:
    """[T_i, V] float32 per prompt, the prompts as the two micro-batches of one two-batch-overlap forward."""
    parts = [(torch.tensor(p), torch.arange(len(p)), NoCacheAttention([len(p)])) for p in PROMPTS]
    with torch.no_grad():
        return [model.compute_logits(h) for h in two_batch_forward(model, parts)]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [t.shape for t in a] == [t.shape for t in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("ep", [True, False], ids=["ep-experts", "model-experts"])
def test_tbo_logits_match_plain_forward(small_dir: Path, ep: bool) -> None:
    model = model_of(small_dir, ep)
    plain, tbo = plain_logits(model), tbo_logits(model)
    assert [t.shape for t in plain] == [(len(p), 512) for p in PROMPTS]
    assert max_diff(plain, tbo) <= TOL
    if ep:  # and both agree with the model's own experts (redundant slots included)
        assert max_diff(plain, plain_logits(model_of(small_dir, ep=False))) <= TOL


# The stages a layer's forward is made of, and where they are defined.
STAGES: list[tuple[type, str]] = [(DecoderLayer, "attention"), (MoE, "before_experts"), (EPExperts, "stages"),
                                  (MoE, "after_experts"), (DecoderLayer, "add_mlp")]


def test_tbo_calls_the_model_stages_in_the_plain_order(small_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = model_of(small_dir, ep=True)
    name_of = {id(m): name for name, m in model.named_modules()}
    trace: list[tuple[str, str, int]] = []  # (stage, module, T)

    def traced(original: Callable[..., Any], stage: str) -> Callable[..., Any]:
        def stage_fn(self: Any, x: torch.Tensor, *args: Any) -> Any:
            trace.append((stage, name_of[id(self)], x.shape[0]))
            return original(self, x, *args)
        return stage_fn

    for cls, stage in STAGES:
        monkeypatch.setattr(cls, stage, traced(getattr(cls, stage), stage))

    # What DecoderLayer.forward and MoE.forward call, derived from the config: dense layers have no MoE stages.
    cfg = model.config
    expected: list[tuple[str, str]] = []
    for i in range(cfg.num_hidden_layers):
        layer = f"model.layers.{i}"
        expected.append(("attention", layer))
        if cfg.is_moe_layer(i):
            expected += [("before_experts", f"{layer}.mlp"), ("stages", f"{layer}.mlp.experts"),
                         ("after_experts", f"{layer}.mlp")]
        expected.append(("add_mlp", layer))
    assert any(stage == "stages" for stage, _ in expected), "the checkpoint must have MoE layers"

    plain_logits(model)
    plain_trace, trace[:] = list(trace), []
    tbo_logits(model)
    for p in PROMPTS:
        assert [(s, m) for s, m, t in plain_trace if t == len(p)] == expected
        assert [(s, m) for s, m, t in trace if t == len(p)] == expected
    # Overlapped, not one micro-batch after the other: the second starts its MoE layers before the first ends.
    last_of_first = max(i for i, (_, _, t) in enumerate(trace) if t == len(PROMPTS[0]))
    first_moe_of_second = min(i for i, (s, _, t) in enumerate(trace) if s == "stages" and t == len(PROMPTS[1]))
    assert first_moe_of_second < last_of_first


def _scale_second(out: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (out[0], out[1] * 1.25, *out[2:])


# A change to each stage of the model's layers: the MLP's input, the routing weights, the MoE's output, the sum.
PLANTS: dict[str, tuple[type, str, Callable[[Any], Any]]] = {
    "attention": (DecoderLayer, "attention", _scale_second),
    "before_experts": (MoE, "before_experts", _scale_second),
    "after_experts": (MoE, "after_experts", lambda out: out * 1.25),
    "add_mlp": (DecoderLayer, "add_mlp", lambda out: out * 0.8),
}


@pytest.mark.parametrize("plant", PLANTS)
def test_a_change_to_a_model_stage_shows_in_both_paths(small_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                       plant: str) -> None:
    model = model_of(small_dir, ep=True)
    before = plain_logits(model)
    cls, stage, change = PLANTS[plant]
    original = getattr(cls, stage)
    monkeypatch.setattr(cls, stage, lambda self, *args: change(original(self, *args)))
    plain, tbo = plain_logits(model), tbo_logits(model)
    assert max_diff(before, plain) > 1e-2, "the planted change must change the logits"
    assert max_diff(plain, tbo) <= TOL
