"""What the GPU backends of expert parallelism check and do at start-up, tested on the CPU through the `deep_ep` and
`deep_gemm` stand-ins of tests/unit/ep/test_ep_gpu_backends.py (which follow those packages' sources):

- DeepEP low-latency mode's limits (the per-rank budget, the hidden sizes its kernels are compiled for, the NVSHMEM
  queue-pair depth) fail when the dispatcher is built, naming the value, the rule and the fix, instead of at the
  first decode dispatch;
- `EPGroup.apply` gives low-latency mode a capped budget and tells the engine to schedule no more per step;
- DeepEP buffers are destroyed explicitly where DeepEP supports it, when the group closes;
- the DeepGEMM backend compiles its kernels (`warm_up`) before the first step, for the shapes that step runs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from types import ModuleType

import pytest
import torch
import torch.distributed as dist

from moemesh.ep import deepep, deepgemm
from moemesh.ep.deepep import DeepEPDispatcher, check_low_latency_budget, ensure_qp_depth
from moemesh.ep.deepgemm import DeepGemmGroupedGemm, contiguous_rungs, masked_rungs
from moemesh.ep.experts import EPExperts
from moemesh.ep.group import EPConfig, EPGroup, low_latency_budget
from moemesh.ep.placement import ExpertPlacement
from moemesh.model.config import ModelConfig
from moemesh.model.deepseek import DeepseekForCausalLM
from moemesh.model.tiny import tiny_config
from moemesh.worker.ep_args import add_ep_arguments, ep_config, validate_ep_arguments
from tests.net import free_port
from tests.unit.ep.test_ep_gpu_backends import (
    LL_HIDDEN,
    _expert_weights,
    _fake_deep_ep,
    _fake_deep_gemm,
    _FakeBuffer,
    _OlderFakeBuffer,
)

QP = "NVSHMEM_QP_DEPTH"


@pytest.fixture
def deepep_stand_in(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """`deep_ep`'s stand-in with the CUDA/NCCL check waived, no buffer made yet, NVSHMEM_QP_DEPTH unset."""
    monkeypatch.setitem(sys.modules, "deep_ep", _fake_deep_ep())
    monkeypatch.setattr(deepep, "_require_cuda_nccl", lambda group: None)
    monkeypatch.setattr(_FakeBuffer, "created", [])
    monkeypatch.setattr(_FakeBuffer, "destroyed", [])
    # Set first so that monkeypatch remembers the value from before the test, then unset: the variable comes back
    # as it was whatever the code under test writes to it.
    monkeypatch.setenv(QP, "0")
    monkeypatch.delenv(QP)
    return monkeypatch


@pytest.fixture
def gemm_stand_in(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """`deep_gemm`'s stand-in (2.x names) on a Hopper; its `gemm_log` records each GEMM run."""
    fake = _fake_deep_gemm("2.x", [])
    monkeypatch.setitem(sys.modules, "deep_gemm", fake)
    monkeypatch.setattr(deepgemm, "_cuda_capability", lambda: (9, 0))
    return fake


def _one_rank(**options: object) -> DeepEPDispatcher:
    return DeepEPDispatcher(None, ExpertPlacement.default(1, 8, 1), **options)


def _route(t: int, k: int = 2, experts: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([torch.randperm(experts)[:k] for _ in range(t)]) if t else torch.zeros(0, k, dtype=torch.int64)
    return ids, torch.rand(t, k)


# ---- DeepEP low-latency limits, checked when the dispatcher is built ----------------------------------------------

def test_a_budget_past_deepeps_limits_fails_when_the_dispatcher_is_built(deepep_stand_in: pytest.MonkeyPatch,
                                                                         gloo_world: None) -> None:
    with pytest.raises(ValueError, match=r"budget 1025 tokens per rank exceeds 1024 \(.*FINISHED_SUM_TAG.*\); "
                                         r"lower --ep-low-latency-budget"):
        _one_rank(mode="low_latency", num_max_dispatch_tokens_per_rank=1025, hidden=2048)
    with pytest.raises(ValueError, match=r"budget 6 on 1 ranks: ep_size \* budget = 6 must be a multiple of 4"):
        _one_rank(mode="low_latency", num_max_dispatch_tokens_per_rank=6, hidden=2048)
    assert _FakeBuffer.created == []  # nothing allocated, nothing sent
    check_low_latency_budget(2, 2)  # 2 tokens on 2 ranks: 4 rows, fine
    with pytest.raises(ValueError, match="multiple of 4"):
        check_low_latency_budget(3, 2)
    # Normal mode has no per-rank budget to check.
    assert _one_rank(mode="normal", num_max_dispatch_tokens_per_rank=2048, hidden=2048).mode == "normal"


def test_low_latency_needs_a_hidden_size_deepep_compiled(deepep_stand_in: pytest.MonkeyPatch,
                                                         gloo_world: None) -> None:
    compiled = r"2048, 2560, 4096, 5120, 6144, 7168, 8192"
    for hidden in (32, 256, 7000):
        with pytest.raises(ValueError, match=rf"compiled only for hidden sizes {compiled}; this model's hidden "
                                             rf"size is {hidden}; use --ep-dispatcher-mode normal or "
                                             rf"--ep-dispatcher all_to_all"):
            _one_rank(mode="low_latency", hidden=hidden)
    # Without `hidden` the buffer waits for the first dispatch, which then fails the same way before sending.
    late = _one_rank(mode="low_latency", num_max_dispatch_tokens_per_rank=4)
    with pytest.raises(ValueError, match="hidden size is 32"):
        late.dispatch(torch.randn(2, 32), *_route(2))
    assert _FakeBuffer.created == []
    for hidden in LL_HIDDEN:
        _one_rank(mode="low_latency", num_max_dispatch_tokens_per_rank=4, hidden=hidden)
    assert len(_FakeBuffer.created) == len(LL_HIDDEN)
    _one_rank(mode="normal", hidden=32)  # normal mode's kernels take any hidden size


def test_the_nvshmem_queue_depth_is_set_or_checked_before_the_buffer(deepep_stand_in: pytest.MonkeyPatch,
                                                                     gloo_world: None) -> None:
    # DeepEP's default depth (1024) takes budgets up to 511: the environment is left alone.
    assert ensure_qp_depth(511) == 1024 and QP not in os.environ
    _one_rank(mode="low_latency", num_max_dispatch_tokens_per_rank=128, hidden=2048)
    assert QP not in os.environ
    # DeepEP's largest budget needs 2 * 1025: set before the buffer, which reads it when made.
    disp = _one_rank(mode="low_latency", num_max_dispatch_tokens_per_rank=1024, hidden=2048)
    assert os.environ[QP] == "4096" and disp._buffer.nvshmem_qp_depth == 4096
    out = disp.combine(torch.zeros(8, 1024, 2048), disp.dispatch(torch.randn(3, 2048), *_route(3))[1])
    assert out.shape == (3, 2048)  # the stand-in's dispatch asserts DeepEP's bound on the depth
    # Set too shallow by the user: a clear error naming the variable, the rule and the fix.
    deepep_stand_in.setenv(QP, "1024")
    with pytest.raises(RuntimeError, match=r"NVSHMEM_QP_DEPTH=1024 is too shallow for DeepEP's low-latency budget "
                                           r"of 600 .*NVSHMEM_QP_DEPTH >= 2 \* \(budget \+ 1\) = 1202; raise "
                                           r"NVSHMEM_QP_DEPTH \(or unset it\) or lower --ep-low-latency-budget"):
        _one_rank(mode="low_latency", num_max_dispatch_tokens_per_rank=600, hidden=2048)
    assert len(_FakeBuffer.created) == 2
    deepep_stand_in.setenv(QP, "deep")
    with pytest.raises(RuntimeError, match=r"NVSHMEM_QP_DEPTH='deep' is not an integer"):
        ensure_qp_depth(128)
    deepep_stand_in.setenv(QP, "2048")
    assert ensure_qp_depth(1023) == 2048 and os.environ[QP] == "2048"


# ---- the budget EPGroup.apply gives DeepEP and the engine ----------------------------------------------------------

def _model(hidden: int) -> DeepseekForCausalLM:
    """Two layers of the tiny preset (one MoE layer: 16 experts, top-4, expert intermediate 128) at `hidden`."""
    torch.manual_seed(0)
    return DeepseekForCausalLM(ModelConfig.from_hf_dict(tiny_config(
        hidden_size=hidden, num_hidden_layers=2, intermediate_size=256, moe_intermediate_size=128)))


def _group(**cfg: object) -> EPGroup:
    return EPGroup(EPConfig(size=1, rank=0, init_addr=f"127.0.0.1:{free_port()}", dispatcher="deepep", **cfg))


def _ep_layers(model: DeepseekForCausalLM) -> list[EPExperts]:
    return [m for m in model.modules() if isinstance(m, EPExperts)]


@pytest.mark.parametrize(("role", "cfg", "asked", "budget"), [
    ("low_latency", {}, 2048, 128),  # the engine's max(max_num_batched_tokens, max_num_seqs), capped
    ("low_latency", {"ll_budget": 64}, 2048, 64),
    ("low_latency", {}, 6, 8),  # fewer asked: rounded up to DeepEP's multiple of 4, never down
    ("normal", {"dispatcher_mode": "low_latency"}, 2048, 128),
    ("normal", {}, 2048, 2048),  # normal mode has no budget: nothing to cap
])
def test_apply_gives_low_latency_a_capped_budget_and_the_engine_the_same(
        deepep_stand_in: pytest.MonkeyPatch, role: str, cfg: dict, asked: int, budget: int) -> None:
    model = _model(2048)
    group = _group(**cfg)
    try:
        group.apply(model, role, asked)
        assert group.max_step_tokens == budget
        (layer,) = _ep_layers(model)
        disp = layer.dispatcher
        assert disp.num_max_dispatch_tokens_per_rank == budget
        if disp.low_latency:
            # The buffer is sized for the budget (the stand-in's size hint: tokens * hidden * ranks * 4)...
            assert _FakeBuffer.created[0]["rdma"] == budget * 2048 * 1 * 4
            # ...and a step of that many tokens goes through DeepEP's low-latency kernels.
            x = torch.randn(budget, 2048)
            ids, w = _route(budget, k=4, experts=16)
            assert layer(x, ids, w).shape == (budget, 2048)
    finally:
        group.close()
    assert len(_FakeBuffer.destroyed) == 1  # the group's close destroyed the buffer explicitly


def test_low_latency_budget_rounds_up_within_the_cap() -> None:
    asked = (1, 4, 5, 127, 128, 129, 4096)
    assert [low_latency_budget(a, 128) for a in asked] == [4, 4, 8, 128, 128, 128, 128]
    assert low_latency_budget(2048, 1000) == 1000  # a cap DeepEP cannot take is the dispatcher's to reject


def test_the_tiny_model_fails_low_latency_at_start_up(deepep_stand_in: pytest.MonkeyPatch) -> None:
    tiny = ModelConfig.from_hf_dict(tiny_config()).hidden_size
    group = _group()
    try:
        with pytest.raises(ValueError, match=rf"this model's hidden size is {tiny}; use --ep-dispatcher-mode normal"):
            group.apply(_model(tiny), "low_latency", 2048)
        assert _FakeBuffer.created == []
        group.apply(_model(tiny), "normal", 2048)  # prefill's normal mode serves it
    finally:
        group.close()


def test_the_low_latency_budget_option_reaches_the_group_config() -> None:
    parser = argparse.ArgumentParser()
    add_ep_arguments(parser)
    parser.add_argument("--device", default="cpu")
    base = ["--ep-size", "2", "--dist-init-addr", "127.0.0.1:1"]
    assert ep_config(parser.parse_args(base)).ll_budget == 128
    assert ep_config(parser.parse_args([*base, "--ep-low-latency-budget", "64"])).ll_budget == 64
    with pytest.raises(SystemExit):
        validate_ep_arguments(parser, parser.parse_args([*base, "--ep-low-latency-budget", "0"]))
    with pytest.raises(ValueError, match="low-latency budget must be >= 1"):
        EPConfig(ll_budget=0)


# ---- DeepEP buffers destroyed explicitly ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["normal", "low_latency"])
def test_deepep_buffers_are_destroyed_explicitly_where_deepep_can(deepep_stand_in: pytest.MonkeyPatch,
                                                                   gloo_world: None, mode: str) -> None:
    disp = _one_rank(mode=mode, hidden=2048)
    assert _FakeBuffer.created[0]["explicitly_destroy"] is True
    buffer = disp._buffer
    disp.close()
    assert _FakeBuffer.destroyed == [buffer]
    disp.close()  # once only
    assert _FakeBuffer.destroyed == [buffer]
    with pytest.raises(RuntimeError, match="closed"):
        disp.dispatch(torch.randn(2, 2048), *_route(2))


def test_an_older_deepep_without_explicit_destruction_keeps_its_destructor(deepep_stand_in: pytest.MonkeyPatch,
                                                                           gloo_world: None) -> None:
    deepep_stand_in.setitem(sys.modules, "deep_ep", _fake_deep_ep(_OlderFakeBuffer))
    disp = _one_rank(mode="low_latency", hidden=2048)  # the older Buffer() would reject explicitly_destroy
    assert _FakeBuffer.created[0]["explicitly_destroy"] is False
    disp.close()
    assert _FakeBuffer.destroyed == [] and disp._buffer is None


def test_the_group_destroys_buffers_only_after_a_healthy_barrier(deepep_stand_in: pytest.MonkeyPatch) -> None:
    group = _group()
    group.apply(_model(2048), "low_latency", 128)

    def peer_gone() -> None:
        raise RuntimeError("Connection closed by peer")

    deepep_stand_in.setattr(dist, "barrier", peer_gone)
    group.close()
    # DeepEP's destroy() is a barrier of its own: with a peer gone it would wait forever.
    assert _FakeBuffer.destroyed == [] and not dist.is_initialized()


# ---- DeepGEMM compiles before the first step -----------------------------------------------------------------------

def _kernel(entry: tuple) -> tuple:
    """What DeepGEMM compiles a masked kernel for, from a logged call: the GEMM, out's shape [S, C, N] and
    ceil(expected_m / 64), which picks its block M and tiling (deepgemm.masked_rungs)."""
    name, shape, expected_m = entry
    return name, shape, math.ceil(expected_m / 64)


def test_warm_up_runs_every_masked_kernel_a_decode_step_can_need(gemm_stand_in: ModuleType) -> None:
    gemm = DeepGemmGroupedGemm()
    s, d, i, capacity = 4, 256, 256, 200  # C = 200: e.g. a budget of 100 tokens on 2 ranks
    weights = gemm.prepare(*_expert_weights(s, d, i, seed=0))
    assert masked_rungs(capacity) == [64, 128, 192, 200] and masked_rungs(40) == [40]
    assert gemm.warm_up(weights, masked_capacity=capacity) == 4
    log = gemm_stand_in.gemm_log
    warmed = {_kernel(e) for e in log}
    masked = "m_grouped_fp8_gemm_nt_masked"
    cp = 256  # C padded as masked() pads it
    assert warmed == {(masked, (s, cp, n), b) for n in (2 * i, d) for b in (1, 2, 3, 4)}
    # Every step afterwards, whatever its load, runs kernels already compiled.
    log.clear()
    gen = torch.Generator().manual_seed(0)
    loads = [torch.full((s,), m) for m in range(1, capacity + 1)]
    loads += [torch.randint(0, capacity + 1, (s,), generator=gen) for _ in range(20)]
    xs = torch.randn(s, capacity, d).bfloat16()
    for counts in loads:
        gemm.masked(xs, counts, weights)
    assert {_kernel(e) for e in log} <= warmed
    log.clear()
    assert gemm.warm_up(weights, masked_capacity=capacity) == 0 and log == []  # once per shape
    fixed = DeepGemmGroupedGemm(expected_m=8)  # a fixed hint (CUDA graphs) makes one kernel
    assert fixed.warm_up(fixed.prepare(*_expert_weights(s, d, i, seed=0)), masked_capacity=capacity) == 1
    assert {e[2] for e in log} == {8}


def test_warm_up_runs_the_contiguous_kernels_up_to_a_full_prefill_step(gemm_stand_in: ModuleType) -> None:
    gemm = DeepGemmGroupedGemm()
    s, d, i = 4, 256, 256
    weights = gemm.prepare(*_expert_weights(s, d, i, seed=1))
    # 600 rows over 4 slots pad to at most 8 blocks of 128; 128 rows over 16 slots to 16 (one row in each).
    assert contiguous_rungs(600, 128, s) == [128, 256, 512, 1024]
    assert contiguous_rungs(128, 128, 16) == [128, 256, 512, 1024, 2048]
    assert contiguous_rungs(1, 64, 8) == [64] and contiguous_rungs(100, 64, 1) == [64, 128]
    assert gemm.warm_up(weights, contiguous_rows=600) == 4
    log = gemm_stand_in.gemm_log
    contiguous = "m_grouped_fp8_gemm_nt_contiguous"
    assert log == [(contiguous, (m, n), None) for m in (128, 256, 512, 1024) for n in (2 * i, d)]
    warmed = set(log)
    log.clear()
    counts = [5, 0, 130, 17]  # padded: 128 + 256 + 128 rows, a rung
    gemm.contiguous(torch.randn(sum(counts), d).bfloat16(), counts, weights)
    assert set(log) <= warmed
    log.clear()
    assert gemm.warm_up(weights, contiguous_rows=600) == 0 and log == []


def _forward(layer: EPExperts, tokens: int) -> None:
    ids, w = _route(tokens, k=4, experts=16)
    layer(torch.randn(tokens, 2048), ids, w)


@pytest.mark.parametrize(("role", "asked", "layout"), [("low_latency", 2048, "masked"), ("normal", 32, "contiguous")])
def test_apply_warms_the_grouped_gemm_up_before_the_first_step(deepep_stand_in: pytest.MonkeyPatch,
                                                               gemm_stand_in: ModuleType, role: str, asked: int,
                                                               layout: str) -> None:
    model = _model(2048)
    group = _group(gemm="deepgemm")
    log = gemm_stand_in.gemm_log
    try:
        group.apply(model, role, asked)
        warm_up = list(log)
        log.clear()
        (layer,) = _ep_layers(model)
        _forward(layer, group.max_step_tokens if layout == "masked" else asked)  # the first step
        step = list(log)
    finally:
        group.close()
    # One MoE layer, 16 slots on this one rank: w13 [16, 256, 2048], w2 [16, 2048, 128]; N = 256 and 2048.
    if layout == "masked":
        # C = 128 (the budget on one rank), padded to 256 rows; expected_m rungs 64 and 128.
        warmed = {_kernel(e) for e in warm_up}
        assert warmed == {("m_grouped_fp8_gemm_nt_masked", (16, 256, n), b) for n in (256, 2048) for b in (1, 2)}
        assert step and {_kernel(e) for e in step} <= warmed
    else:
        # 32 tokens x top-4 = 128 rows, at most one in each of the 16 slots: M up to 16 blocks of 128.
        assert warm_up == [("m_grouped_fp8_gemm_nt_contiguous", (m, n), None) for m in (128, 256, 512, 1024, 2048)
                           for n in (256, 2048)]
        gemms = {(name, shape[1]) for name, shape, _ in warm_up}
        assert step and {(name, shape[1]) for name, shape, _ in step} <= gemms
        assert max(shape[0] for _, shape, _ in step) <= 2048  # within the rungs (DeepGEMM's M is not compiled in)
