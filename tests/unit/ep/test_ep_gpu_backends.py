"""The GPU backends of expert parallelism, DeepEP dispatch (`shared/ep/deepep.py`) and DeepGEMM grouped GEMMs
(`shared/ep/deepgemm.py`), tested on the CPU: their start-up failures, their plain-torch helpers, and their logic
driven through stand-ins for `deep_ep` and `deep_gemm` that follow those packages' documented contracts (the DeepEP
stand-in moves data over gloo between real processes; the DeepGEMM one multiplies the quantized operands in float32).
Tests that need the real packages on GPUs are skipped where those are missing.

The DeepEP stand-in across two rank processes is in tests/processes/ep/test_deepep_ranks.py; what the backends check
and do at start-up (DeepEP's low-latency limits, buffer destruction, DeepGEMM's warm-up) in test_ep_gpu_startup.py.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest
import torch
import torch.distributed as dist

from moemesh.ep import deepep, deepgemm
from moemesh.ep.deepep import DeepEPDispatcher, expand_received, reduce_pairs
from moemesh.ep.deepgemm import (
    DeepGemmGroupedGemm,
    contiguous_layout,
    dequantize_blocks,
    dequantize_rows,
    emulated_api,
    expected_rows,
    quantize_blocks,
    quantize_rows,
)
from moemesh.ep.dispatch import make_dispatcher
from moemesh.ep.experts import TorchGroupedGemm, make_grouped_gemm
from moemesh.ep.placement import ExpertPlacement
from tests.paths import ROOT

BENCH = ROOT / "bench" / "ep_hopper_moe.py"


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:
        return False
    return True


# ---- missing packages, wrong machines ------------------------------------------------------------------------------

def test_deepep_missing_package_names_it_and_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    placement = ExpertPlacement.default(1, 8, 2)
    monkeypatch.setitem(sys.modules, "deep_ep", None)  # makes `import deep_ep` raise ImportError
    with pytest.raises(RuntimeError, match=r"deep_ep.*all_to_all"):
        make_dispatcher("deepep", None, placement)
    with pytest.raises(RuntimeError, match=r"deep_ep.*all_to_all"):
        DeepEPDispatcher(None, placement, mode="low_latency")


def test_deepgemm_missing_package_names_it_and_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deep_gemm", None)
    with pytest.raises(RuntimeError, match=r"deep_gemm.*torch"):
        make_grouped_gemm("deepgemm")


@pytest.mark.skipif(_importable("deep_ep") or _importable("deep_gemm"), reason="deep_ep or deep_gemm is installed")
def test_packages_really_missing_here_fail_at_construction() -> None:
    with pytest.raises(RuntimeError, match=r"deep_ep.*all_to_all"):
        make_dispatcher("deepep", None, ExpertPlacement.default(1, 8, 2))
    with pytest.raises(RuntimeError, match=r"deep_gemm.*torch"):
        make_grouped_gemm("deepgemm")


def test_broken_builds_fail_like_missing_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What a broken wheel does: the package is found, its extension is not.
    for name in ("deep_ep", "deep_gemm"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise OSError('libnvshmem_host.so.3: cannot open it')\n")
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match=r"deep_ep.*OSError.*libnvshmem.*all_to_all"):
        make_dispatcher("deepep", None, ExpertPlacement.default(1, 8, 2))
    with pytest.raises(RuntimeError, match=r"deep_gemm.*OSError.*torch"):
        make_grouped_gemm("deepgemm")


def test_deepep_needs_cuda_and_an_nccl_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deep_ep", _fake_deep_ep())
    placement = ExpertPlacement.default(1, 8, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"CUDA.*all_to_all"):
        DeepEPDispatcher(None, placement)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match=r"initialized torch.distributed NCCL.*all_to_all"):
        DeepEPDispatcher(None, placement)


def test_deepep_rejects_a_gloo_group(monkeypatch: pytest.MonkeyPatch, gloo_world: None) -> None:
    monkeypatch.setitem(sys.modules, "deep_ep", _fake_deep_ep())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match=r"NCCL.*'gloo'.*all_to_all"):
        DeepEPDispatcher(None, ExpertPlacement.default(1, 8, 1))


def test_deepgemm_needs_a_hopper_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deep_gemm", _fake_deep_gemm("2.x", []))
    monkeypatch.setattr(deepgemm, "_cuda_capability", lambda: None)
    with pytest.raises(RuntimeError, match=r"deep_gemm.*Hopper.*no CUDA device.*torch"):
        make_grouped_gemm("deepgemm")
    monkeypatch.setattr(deepgemm, "_cuda_capability", lambda: (8, 0))
    with pytest.raises(RuntimeError, match=r"deep_gemm.*Hopper.*\(8, 0\).*torch"):
        make_grouped_gemm("deepgemm")


@pytest.mark.parametrize("version", ["1.x", "2.0", "2.x"])
def test_deepgemm_without_a_masked_gemm_names_every_spelling(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    fake = _fake_deep_gemm(version, [])
    _, masked, _, _, aliases = _NAMES[version]
    for name in (masked, *aliases):
        delattr(fake, name)
    monkeypatch.setitem(sys.modules, "deep_gemm", fake)
    monkeypatch.setattr(deepgemm, "_cuda_capability", lambda: (9, 0))
    with pytest.raises(RuntimeError, match=r"deep_gemm \(.*fake\) lacks m_grouped_fp8_gemm_nt_masked or "
                                           r"fp8_m_grouped_gemm_nt_masked or m_grouped_gemm_fp8_fp8_bf16_nt_masked"
                                           r".*grouped GEMM 'torch'"):
        make_grouped_gemm("deepgemm")


# ---- FP8 quantization and the contiguous layout (plain torch) ------------------------------------------------------

def _e4m3_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest e4m3 error bound: half a step of 3 mantissa bits, or half the subnormal step (2^-9)."""
    return x.abs() * 2.0 ** -4 + scale * 2.0 ** -10


@pytest.mark.parametrize("k", [128, 384, 200])
def test_quantize_rows_round_trips_within_e4m3_rounding(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    # Groups of very different magnitudes, and an all-zero row.
    x = torch.randn(6, k, generator=gen) * torch.logspace(-3, 3, 6).unsqueeze(1)
    x[2] = 0
    q, scales = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == (6, math.ceil(k / 128))
    assert q.float().abs().max() <= 448 and torch.isfinite(scales).all() and (scales > 0).all()
    back = dequantize_rows(q, scales)
    per_col = scales.repeat_interleave(128, dim=1)[:, :k]
    assert ((back - x).abs() <= _e4m3_bound(x, per_col)).all()
    assert (back[2] == 0).all()
    # The group's largest value maps onto e4m3's largest: the scale is amax / 448.
    amax = torch.nn.functional.pad(x.abs(), (0, scales.shape[1] * 128 - k)).view(6, -1, 128).amax(-1)
    torch.testing.assert_close(scales[amax > 0], amax[amax > 0] / 448)
    # Quantizing what was dequantized changes nothing.
    q2, scales2 = quantize_rows(back)
    assert torch.equal(q2.float(), q.float()) and torch.equal(scales2, scales)


@pytest.mark.parametrize(("n", "k"), [(256, 128), (200, 300)])
def test_quantize_blocks_matches_a_per_block_loop(n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n + k)
    w = torch.randn(2, n, k, generator=gen)
    w[1, :128, :128] *= 1000  # one loud block must not change its neighbours' scales
    q, scales = quantize_blocks(w)
    assert q.shape == w.shape and scales.shape == (2, math.ceil(n / 128), math.ceil(k / 128))
    for s in range(2):
        for bi in range(scales.shape[1]):
            for bj in range(scales.shape[2]):
                block = w[s, bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]
                assert scales[s, bi, bj].item() == pytest.approx(block.abs().max().item() / 448, rel=1e-6)
    back = dequantize_blocks(q, scales)
    full = scales.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :n, :k]
    assert ((back - w).abs() <= _e4m3_bound(w, full)).all()


def test_power_of_two_scales_for_blackwell() -> None:
    x = torch.randn(4, 256) * 3
    q, scales = quantize_rows(x, pow2=True)
    assert torch.equal(torch.exp2(torch.log2(scales).round()), scales)
    assert (scales >= x.abs().view(4, 2, 128).amax(-1) / 448).all()  # rounded up: nothing saturates
    back = dequantize_rows(q, scales)
    assert ((back - x).abs() <= _e4m3_bound(x, scales.repeat_interleave(128, 1))).all()
    _, wscales = quantize_blocks(torch.randn(256, 256), pow2=True)
    assert torch.equal(torch.exp2(torch.log2(wscales).round()), wscales)


@pytest.mark.parametrize("alignment", [1, 4, 128])
def test_contiguous_layout_pads_every_group_to_the_alignment(alignment: int) -> None:
    counts = [0, 3, 4, 5, 0, 1, 130]
    layout = contiguous_layout(counts, alignment)
    expected_rows, expected_m = [], []
    for g, c in enumerate(counts):
        start = len(expected_m)
        expected_rows += range(start, start + c)
        padded = -(-c // alignment) * alignment
        expected_m += [g] * c + [-1] * (padded - c)
    assert layout.rows.tolist() == expected_rows
    assert layout.m_indices.dtype == torch.int32 and layout.m_indices.tolist() == expected_m
    assert layout.num_rows % alignment == 0
    empty = contiguous_layout([0, 0], alignment)
    assert empty.num_rows == 0 and empty.rows.numel() == 0
    with pytest.raises(ValueError):
        contiguous_layout([1, -1], alignment)


def test_expected_rows_is_the_mean_over_busy_slots() -> None:
    assert expected_rows(torch.tensor([0, 4, 6, 0]), 64) == 5
    assert expected_rows(torch.tensor([0, 0]), 64) == 1
    assert expected_rows(torch.tensor([300, 300]), 64) == 64


# ---- the DeepGEMM backend over a stand-in deep_gemm ----------------------------------------------------------------

_NAMES = {  # (contiguous, masked, alignment, scale layout, aliases of the masked GEMM) per API generation
    "1.x": ("m_grouped_gemm_fp8_fp8_bf16_nt_contiguous", "m_grouped_gemm_fp8_fp8_bf16_nt_masked",
            "get_m_alignment_for_contiguous_layout", "get_col_major_tma_aligned_tensor", ()),
    "2.0": ("m_grouped_fp8_gemm_nt_contiguous", "fp8_m_grouped_gemm_nt_masked",
            "get_mk_alignment_for_contiguous_layout", "get_mn_major_tma_aligned_tensor", ()),
    "2.x": ("m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
            "get_mk_alignment_for_contiguous_layout", "get_mn_major_tma_aligned_tensor",
            ("fp8_m_grouped_gemm_nt_masked",)),
}


def _fake_deep_gemm(version: str, calls: list[str], alignment: int = 128) -> ModuleType:
    """A `deep_gemm` of the given generation's names whose kernels are the float32 reference (it checks dtypes,
    shapes and the contiguous layout's aligned blocks as the kernels need them) and that records what is called:
    the names in `calls`, and each GEMM as (name, out's shape, expected_m or None) in `module.gemm_log`."""
    api = emulated_api(alignment)
    module = ModuleType("deep_gemm")
    module.__version__ = f"{version}+fake"
    module.gemm_log = []

    def recorded(name: str, fn: Any) -> Any:
        def call(*args: Any) -> Any:
            calls.append(name)
            if len(args) > 2:  # a GEMM: (lhs, rhs, out, ...)
                module.gemm_log.append((name, tuple(args[2].shape), args[4] if len(args) > 4 else None))
            return fn(*args)
        return call

    contiguous, masked, align, scale, aliases = _NAMES[version]
    setattr(module, contiguous, recorded(contiguous, api.contiguous))
    for name in (masked, *aliases):
        setattr(module, name, recorded(masked, api.masked))
    setattr(module, align, lambda: alignment)
    setattr(module, scale, recorded(scale, lambda sf: sf))
    return module


def _expert_weights(s: int, d: int, i: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return ((torch.randn(s, 2 * i, d, generator=gen) * d ** -0.5).bfloat16(),
            (torch.randn(s, d, i, generator=gen) * i ** -0.5).bfloat16())


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize(("version", "alignment"), [("1.x", 128), ("2.0", 128), ("2.x", 128), ("2.x", 64)])
def test_deepgemm_backend_over_every_api_generation(monkeypatch: pytest.MonkeyPatch, version: str,
                                                    alignment: int) -> None:
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "deep_gemm", _fake_deep_gemm(version, calls, alignment))
    monkeypatch.setattr(deepgemm, "_cuda_capability", lambda: (9, 0))
    gemm = make_grouped_gemm("deepgemm")
    assert isinstance(gemm, DeepGemmGroupedGemm) and not gemm.pow2_scales
    contiguous_name, masked_name, _, scale_name, _ = _NAMES[version]
    assert gemm.api.names[:2] == (contiguous_name, masked_name)  # the newest spelling where there are several
    s, d, i = 4, 256, 128
    w13, w2 = _expert_weights(s, d, i, seed=len(version))
    weights = gemm.prepare(w13, w2)
    assert weights.w13[0].dtype == torch.float8_e4m3fn and weights.w13[1].shape == (s, 2, 2)
    assert weights.w2[0].shape == (s, d, i) and weights.w2[1].shape == (s, 2, 1)
    ref, fp8_ref = TorchGroupedGemm(), DeepGemmGroupedGemm.emulated()

    counts = [5, 0, 130, 17]  # an empty slot, and one spilling into a second aligned block
    xs = torch.randn(sum(counts), d).bfloat16()
    out = gemm.contiguous(xs, counts, weights)
    assert out.shape == xs.shape and out.dtype == xs.dtype
    assert torch.equal(out, fp8_ref.contiguous(xs, counts, fp8_ref.prepare(w13, w2)))
    assert _rel(out, ref.contiguous(xs, counts, (w13, w2))) < 0.1  # FP8's own error, ~6.5% for this chain
    assert calls.count(contiguous_name) == 2 and calls.count(scale_name) == 2

    for c in (40, 200):  # 200: past DeepGEMM 1.x's block M, padded to a multiple of 256 inside
        xm = torch.randn(s, c, d).bfloat16()
        cm = torch.tensor([3, 0, c, 17])
        out = gemm.masked(xm, cm, weights)
        assert out.shape == xm.shape and out.is_contiguous()
        valid = torch.arange(c).unsqueeze(0) < cm.unsqueeze(1)
        assert _rel(out[valid], ref.masked(xm, cm, (w13, w2))[valid]) < 0.1
    assert calls.count(masked_name) == 4

    assert gemm.contiguous(xs[:0], [0] * s, weights).shape == (0, d)
    assert gemm.masked(xm[:, :0], torch.zeros(s, dtype=torch.int64), weights).shape == (s, 0, d)


def test_deepgemm_float32_activations_come_back_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deep_gemm", _fake_deep_gemm("2.x", []))
    monkeypatch.setattr(deepgemm, "_cuda_capability", lambda: (9, 0))
    gemm = DeepGemmGroupedGemm(expected_m=8)
    w13, w2 = _expert_weights(2, 128, 128, seed=7)
    weights = gemm.prepare(w13.float(), w2.float())
    xs = torch.randn(9, 128)
    out = gemm.contiguous(xs, [4, 5], weights)
    assert out.dtype == torch.float32
    assert _rel(out, TorchGroupedGemm().contiguous(xs, [4, 5], (w13.float(), w2.float()))) < 0.1


def test_deepgemm_on_blackwell_uses_power_of_two_scales(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "deep_gemm", _fake_deep_gemm("2.x", calls))
    monkeypatch.setattr(deepgemm, "_cuda_capability", lambda: (10, 0))
    gemm = DeepGemmGroupedGemm()
    w13, w2 = _expert_weights(2, 128, 128, seed=3)
    weights = gemm.prepare(w13, w2)
    for sf in (weights.w13[1], weights.w2[1]):
        assert torch.equal(torch.exp2(torch.log2(sf).round()), sf)
    xs = torch.randn(6, 128).bfloat16()
    assert _rel(gemm.contiguous(xs, [2, 4], weights), TorchGroupedGemm().contiguous(xs, [2, 4], (w13, w2))) < 0.1
    assert "get_mn_major_tma_aligned_tensor" not in calls  # the library lays out Blackwell's scales itself


def test_deepgemm_prepare_rejects_shapes_its_kernels_cannot_take(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deep_gemm", _fake_deep_gemm("2.x", []))
    monkeypatch.setattr(deepgemm, "_cuda_capability", lambda: (9, 0))
    gemm = DeepGemmGroupedGemm()
    with pytest.raises(ValueError, match=r"hidden D.*128"):
        gemm.prepare(*_expert_weights(2, 64, 128, seed=0))
    with pytest.raises(ValueError, match=r"intermediate I.*128"):
        gemm.prepare(*_expert_weights(2, 128, 32, seed=0))


# ---- DeepEP's receiver-side bookkeeping (plain torch) --------------------------------------------------------------

def test_expand_and_reduce_received_tokens() -> None:
    gen = torch.Generator().manual_seed(0)
    r, k, slots, d = 7, 3, 4, 5
    idx = torch.randint(-1, slots, (r, k), generator=gen)
    idx[2] = -1  # a token none of whose slots are here would not be sent; -1 rows must still be harmless
    weights = torch.rand(r, k, generator=gen)
    weights[idx < 0] = float("nan")  # what DeepEP leaves there is unspecified: it must never be read
    token, slot, weight = expand_received(idx, weights, slots, num_pairs=int((idx >= 0).sum()))
    pairs = sorted((int(idx[t, j]), t, j) for t in range(r) for j in range(k) if idx[t, j] >= 0)
    assert slot.tolist() == [p[0] for p in pairs]
    assert token.tolist() == [p[1] for p in pairs]
    assert weight.tolist() == [weights[t, j].item() for _, t, j in pairs]
    token2, slot2, weight2 = expand_received(idx, weights, slots)  # N counted here
    assert torch.equal(token2, token) and torch.equal(slot2, slot) and torch.equal(weight2, weight)

    y = torch.randn(len(pairs), d, generator=gen)
    out = reduce_pairs(y, token, weight, r)
    ref = torch.zeros(r, d)
    for row, (_, t, j) in enumerate(pairs):
        ref[t] += weights[t, j] * y[row]
    torch.testing.assert_close(out, ref)
    assert reduce_pairs(y[:0], token[:0], weight[:0], 3).shape == (3, d)


# ---- the DeepEP dispatcher over a stand-in deep_ep -----------------------------------------------------------------

class _Event:
    def current_stream_wait(self) -> None:
        pass


class _Config:
    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return hidden_bytes * num_ranks * 256

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return 0


def _exchange(parts: list[torch.Tensor], group: Any) -> list[torch.Tensor]:
    """parts[r]: float64 rows for rank r -> the rows each rank sent here, by source rank (gloo all-to-all)."""
    send_counts = torch.tensor([p.shape[0] for p in parts], dtype=torch.int64)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send = torch.cat(parts)
    recv = send.new_empty(int(recv_counts.sum()), send.shape[1])
    dist.all_to_all_single(recv, send, recv_counts.tolist(), send_counts.tolist(), group=group)
    return list(recv.split(recv_counts.tolist()))


LL_HIDDEN = (2048, 2560, 4096, 5120, 6144, 7168, 8192)  # DeepEP's SWITCH_HIDDEN (csrc/kernels/launch.cuh)


class _FakeBuffer:
    """DeepEP's `Buffer` as its docs, sources and tests describe it, moving data over gloo, synchronously.

    Normal mode: a token goes once to each rank holding any of its experts, with all its top-k ids made local there
    (-1 for experts elsewhere; their weights are left NaN) and its weights; combine sums what comes back, unweighted.
    Low-latency mode: one row per (token, expert) into that expert's window of num_max * ranks rows (the rest
    NaN), counts int32; combine sums the rows back weighted by the top-k weights. Its dispatch asserts what DeepEP's
    does: a compiled hidden size, ranks * num_max % 4 == 0, num_max <= 1024 (past it DeepEP's counters break) and
    the NVSHMEM queue-pair depth read from the environment at construction >= 2 * (num_max + 1).
    Buffers made with `explicitly_destroy` must be `destroy()`ed (each destroy is recorded in `destroyed`).
    """

    num_sms = 20
    created: ClassVar[list[dict[str, Any]]] = []
    destroyed: ClassVar[list[_FakeBuffer]] = []

    def __init__(self, group: Any, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, explicitly_destroy: bool = False) -> None:
        self.group, self.rank, self.ranks = group, group.rank(), group.size()
        self.low_latency_mode, self.explicitly_destroy = low_latency_mode, explicitly_destroy
        if low_latency_mode:
            self.nvshmem_qp_depth = int(os.environ.get("NVSHMEM_QP_DEPTH", "1024"))
        _FakeBuffer.created.append(dict(nvl=num_nvl_bytes, rdma=num_rdma_bytes, low_latency=low_latency_mode,
                                        qps=num_qps_per_rank, explicitly_destroy=explicitly_destroy))

    def destroy(self) -> None:
        assert self.explicitly_destroy, "`explicitly_destroy` flag must be set"
        assert self not in _FakeBuffer.destroyed
        _FakeBuffer.destroyed.append(self)

    @staticmethod
    def set_num_sms(n: int) -> None:
        assert n % 2 == 0
        _FakeBuffer.num_sms = n

    @staticmethod
    def capture() -> _Event:
        return _Event()

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> _Config:
        return _Config()

    @staticmethod
    def get_combine_config(num_ranks: int) -> _Config:
        return _Config()

    @staticmethod
    def get_low_latency_rdma_size_hint(tokens: int, hidden: int, ranks: int, experts: int) -> int:
        return tokens * hidden * ranks * 4

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: Any = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False) -> tuple:
        assert topk_idx.dtype == torch.int64 and not self.low_latency_mode
        local = num_experts // self.ranks
        rank_of = torch.where(topk_idx >= 0, topk_idx // local, -1)
        in_rank = torch.stack([(rank_of == r).any(dim=1) for r in range(self.ranks)], dim=1)
        per_expert = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts).int()
        self.num_experts = num_experts
        return in_rank.sum(0).int(), None, per_expert, in_rank, _Event()

    def dispatch(self, x: torch.Tensor, handle: Any = None, num_tokens_per_rank: Any = None,
                 num_tokens_per_rdma_rank: Any = None, is_token_in_rank: Any = None, num_tokens_per_expert: Any = None,
                 topk_idx: Any = None, topk_weights: Any = None, expert_alignment: int = 1, config: Any = None,
                 previous_event: Any = None, async_finish: bool = False, allocate_on_comm_stream: bool = False
                 ) -> tuple:
        assert x.dtype == torch.bfloat16 and topk_weights.dtype == torch.float32 and handle is None
        local, d, k = self.num_experts // self.ranks, x.shape[1], topk_idx.shape[1]
        parts, sent = [], []
        for r in range(self.ranks):
            tokens = is_token_in_rank[:, r].nonzero().squeeze(1)
            idx = topk_idx[tokens]
            here = (idx >= r * local) & (idx < (r + 1) * local)
            parts.append(torch.cat([x[tokens].double(), torch.where(here, idx - r * local, -1).double(),
                                    topk_weights[tokens].masked_fill(~here, float("nan")).double()], dim=1))
            sent.append(tokens)
        received = _exchange(parts, self.group)
        rows = torch.cat(received)
        recv_idx = rows[:, d:d + k].long()
        counts = [int((recv_idx == e).sum()) for e in range(local)]
        layout = (sent, [p.shape[0] for p in received], x.shape[0])
        return rows[:, :d].bfloat16(), recv_idx, rows[:, d + k:].float(), counts, layout, _Event()

    def combine(self, x: torch.Tensor, handle: Any, topk_weights: Any = None, config: Any = None,
                previous_event: Any = None, async_finish: bool = False, allocate_on_comm_stream: bool = False
                ) -> tuple:
        assert x.dtype == torch.bfloat16
        sent, recv_counts, num_tokens = handle
        back = _exchange(list(x.double().split(recv_counts)), self.group)
        out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float64)
        for tokens, rows in zip(sent, back, strict=True):
            out.index_add_(0, tokens, rows)
        return out.bfloat16(), None, _Event()

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, use_fp8: bool = True, async_finish: bool = False,
                             return_recv_hook: bool = False, **_: Any) -> tuple:
        assert self.low_latency_mode and not use_fp8 and x.dtype == torch.bfloat16 and topk_idx.dtype == torch.int64
        assert x.shape[0] <= num_max_dispatch_tokens_per_rank <= 1024 and x.shape[1] in LL_HIDDEN
        assert self.ranks * num_max_dispatch_tokens_per_rank % 4 == 0
        assert self.nvshmem_qp_depth >= (num_max_dispatch_tokens_per_rank + 1) * 2
        local, d = num_experts // self.ranks, x.shape[1]
        pos = torch.arange(topk_idx.numel()).view(topk_idx.shape)
        parts = []
        for r in range(self.ranks):
            here = (topk_idx >= r * local) & (topk_idx < (r + 1) * local)
            flat = pos[here]
            t = flat // topk_idx.shape[1]
            parts.append(torch.cat([x[t].double(), flat.unsqueeze(1).double(),
                                    (topk_idx[here] - r * local).unsqueeze(1).double()], dim=1))
        capacity = num_max_dispatch_tokens_per_rank * self.ranks
        recv_x = torch.full((local, capacity, d), float("nan"), dtype=torch.bfloat16)
        count = torch.zeros(local, dtype=torch.int32)
        source = []  # (expert, row, source rank, source flat (token, k) position)
        for j, rows in enumerate(_exchange(parts, self.group)):
            for row in rows:
                e = int(row[d + 1])
                recv_x[e, count[e]] = row[:d].bfloat16()
                source.append((e, int(count[e]), j, int(row[d])))
                count[e] += 1
        return recv_x, count, (source, x.shape[0]), None, lambda: None

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: Any,
                            zero_copy: bool = False, async_finish: bool = False, return_recv_hook: bool = False,
                            out: Any = None, **_: Any) -> tuple:
        assert x.dtype == torch.bfloat16 and x.dim() == 3
        source, num_tokens = handle
        d = x.shape[2]
        parts = [[] for _ in range(self.ranks)]
        for e, row, j, flat in source:
            parts[j].append(torch.cat([x[e, row].double(), torch.tensor([flat], dtype=torch.float64)]))
        stacked = [torch.stack(p) if p else torch.zeros(0, d + 1, dtype=torch.float64) for p in parts]
        combined = torch.zeros(num_tokens, d, dtype=torch.float64)
        flat_weights = topk_weights.reshape(-1).double()
        for rows in _exchange(stacked, self.group):
            flat = rows[:, d].long()
            combined.index_add_(0, flat // topk_idx.shape[1], rows[:, :d] * flat_weights[flat].unsqueeze(1))
        return combined.bfloat16(), None, lambda: None


class _OlderFakeBuffer(_FakeBuffer):
    """A DeepEP from before `explicitly_destroy`: its Buffer frees only in its destructor."""

    def __init__(self, group: Any, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24) -> None:
        super().__init__(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank)

    destroy = None  # older builds have no destroy()


def _fake_deep_ep(buffer: type = _FakeBuffer) -> ModuleType:
    module = ModuleType("deep_ep")
    module.Buffer = buffer
    return module


def test_deepep_options_and_registry(monkeypatch: pytest.MonkeyPatch, gloo_world: None) -> None:
    monkeypatch.setitem(sys.modules, "deep_ep", _fake_deep_ep())
    monkeypatch.setattr(deepep, "_require_cuda_nccl", lambda group: None)
    placement = ExpertPlacement.default(1, 8, 1)
    disp = make_dispatcher("deepep", None, placement)
    assert isinstance(disp, DeepEPDispatcher) and disp.mode == "normal" and disp.num_max_dispatch_tokens_per_rank == 128
    _FakeBuffer.created.clear()
    disp = make_dispatcher("deepep", None, placement, mode="low_latency", num_max_dispatch_tokens_per_rank=4,
                           hidden=2048, num_sms=8)
    # `hidden` allocates now, sized by DeepEP's hint, with one queue pair per local slot.
    assert _FakeBuffer.created == [dict(nvl=0, rdma=4 * 2048 * 1 * 4, low_latency=True, qps=8,
                                        explicitly_destroy=True)]
    assert _FakeBuffer.num_sms == 8
    with pytest.raises(ValueError, match="exceeds num_max_dispatch_tokens_per_rank = 4"):
        next(disp.dispatch_stages(torch.randn(5, 2048), torch.zeros(5, 2, dtype=torch.int64), torch.ones(5, 2)))
    with pytest.raises(ValueError, match="hidden 2048"):
        disp.dispatch(torch.randn(2, 4096), torch.zeros(2, 2, dtype=torch.int64), torch.ones(2, 2))
    for bad in (dict(mode="fast"), dict(num_max_dispatch_tokens_per_rank=0), dict(num_sms=3),
                dict(num_nvl_bytes=-1)):
        with pytest.raises(ValueError):
            DeepEPDispatcher(None, placement, **bad)

    def untuned(num_ranks: int) -> None:
        raise AssertionError(f"Unsupported number of EP ranks: {num_ranks}")

    monkeypatch.setattr(_FakeBuffer, "get_dispatch_config", staticmethod(untuned))
    with pytest.raises(RuntimeError, match=r"no normal-mode config for 1 ranks.*all_to_all"):
        DeepEPDispatcher(None, placement, mode="normal")
    assert DeepEPDispatcher(None, placement, mode="low_latency").mode == "low_latency"  # needs no such table


@pytest.mark.parametrize("mode", ["normal", "low_latency"])
def test_deepep_dispatcher_in_one_rank(monkeypatch: pytest.MonkeyPatch, gloo_world: None, mode: str) -> None:
    monkeypatch.setitem(sys.modules, "deep_ep", _fake_deep_ep())
    monkeypatch.setattr(deepep, "_require_cuda_nccl", lambda group: None)
    got, ref = _run_ep_layer(None, 0, 1, mode, seed=5)
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape and (g - r).abs().max() <= 2e-2 * r.abs().max().clamp(min=1)


def _run_ep_layer(group: Any, rank: int, world: int, mode: str, seed: int, device: str = "cpu"
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One MoE layer's routed experts over EP through DeepEP, two micro-batches interleaved as TBO interleaves them
    (the second empty on rank 1), against the single-process computation of this rank's tokens."""
    from moemesh.ep.experts import EPExperts
    from moemesh.model.moe import RoutedExperts

    e, d, i, k = 8, 2048, 16, 3  # 2048: the smallest hidden DeepEP's low-latency kernels are built for
    placement = ExpertPlacement.default(1, e, world, redundant=2 * world)  # replicas: several slots per expert
    torch.manual_seed(seed)  # the same weights on every rank
    experts = RoutedExperts(e, d, i)
    with torch.no_grad():
        experts.w13.normal_(std=d ** -0.5)
        experts.w2.normal_(std=i ** -0.5)
    experts.to(device)
    dispatcher = make_dispatcher("deepep", group, placement, mode=mode, num_max_dispatch_tokens_per_rank=16,
                                 hidden=d)
    layer = EPExperts(experts, 0, placement, dispatcher, "torch")
    gen = torch.Generator().manual_seed(seed + 100 + rank)
    batches = []
    for b, t in enumerate((5 + 3 * rank, 0 if rank == 1 else 4)):
        x = torch.randn(t, d, generator=gen).bfloat16().float()  # bf16-exact: DeepEP moves bf16
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]) if t else torch.zeros(0, k)
        ids = ids.long()
        if t and b == 0:
            ids[0, 1] = -1  # a padding entry
        w = torch.rand(t, k, generator=gen)
        batches.append((x.to(device), ids.to(device), w.to(device)))
    stages = [layer.stages(*batch) for batch in batches]
    results: list[Any] = [None, None]
    while any(r is None for r in results):
        for n, st in enumerate(stages):
            if results[n] is None:
                try:
                    next(st)
                except StopIteration as done:
                    results[n] = done.value
    with torch.no_grad():
        refs = [_reference(experts, *batch) for batch in batches]
    return [r.float().cpu() for r in results], [r.float().cpu() for r in refs]


def _reference(experts: Any, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, D], ids [T, K] (-1: none), w [T, K] -> [T, D]: sum over k of w * expert(x), one token at a time."""
    i = experts.w2.shape[2]
    ref = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            ex = int(ids[t, j])
            if ex >= 0:
                h = x[t] @ experts.w13[ex].t()
                ref[t] += w[t, j] * (torch.nn.functional.silu(h[:i]) * h[i:]) @ experts.w2[ex].t()
    return ref


# ---- the Hopper benchmark ------------------------------------------------------------------------------------------

def _bench_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ep_hopper_moe", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_check_passes_a_right_backend_and_fails_a_wrong_one(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench_module()
    gen = torch.Generator().manual_seed(0)
    w13, w2 = bench.make_weights(bench.SMALL, torch.device("cpu"), gen)
    right = DeepGemmGroupedGemm.emulated()
    weights = right.prepare(w13, w2)
    assert bench.check(bench.SMALL, right, w13, w2, weights, 64, gen)
    assert capsys.readouterr().out.count(": ok") == 2

    class FlippedSlots(DeepGemmGroupedGemm):  # a plausible bug: each slot's rows multiplied by another's weights
        def contiguous(self, xs: torch.Tensor, counts: list[int], weights: Any) -> torch.Tensor:
            flipped = type(weights)((weights.w13[0].flip(0), weights.w13[1].flip(0)),
                                    (weights.w2[0].flip(0), weights.w2[1].flip(0)))
            return super().contiguous(xs, counts, flipped)

    wrong = FlippedSlots.emulated()
    assert not bench.check(bench.SMALL, wrong, w13, w2, weights, 64, gen)
    assert "FAILED" in capsys.readouterr().out


def test_bench_routes_as_deepseek_v3() -> None:
    bench = _bench_module()
    shape = bench.DEEPSEEK_V3
    ids = bench.route(shape, 64, torch.device("cpu"), torch.Generator().manual_seed(1))
    assert ids.shape == (64, shape.topk) and ids.min() >= 0 and ids.max() < shape.experts
    assert all(len(set(row)) == shape.topk for row in ids.tolist())
    groups = ids // (shape.experts // shape.groups)
    assert all(len(set(row)) <= shape.topk_groups for row in groups.tolist())


@pytest.mark.skipif(not torch.cuda.is_available() or not _importable("deep_gemm"), reason="needs deep_gemm and CUDA")
def test_deepgemm_on_the_gpu_matches_the_fp8_reference() -> None:
    bench = _bench_module()
    if bench.skip_reason() is not None:
        pytest.skip(bench.skip_reason())
    gemm = DeepGemmGroupedGemm()
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13, w2 = bench.make_weights(bench.SMALL, torch.device("cuda"), gen)
    assert bench.check(bench.SMALL, gemm, w13, w2, gemm.prepare(w13, w2), 256, gen)



@pytest.mark.parametrize("pow2", [False, True])
def test_deepgemm_requantizes_only_the_slots_a_switch_wrote(pow2: bool) -> None:
    """`prepare_slots` after a placement switch wrote slots 0 and 2 in place: their FP8 weights and scales are a fresh
    `prepare`'s, every other slot's stay the very bytes they were."""
    gemm = DeepGemmGroupedGemm.emulated(pow2_scales=pow2)
    s, d, i = 4, 256, 128
    w13, w2 = _expert_weights(s, d, i, seed=5)
    weights = gemm.prepare(w13, w2)
    before = [t.clone() for t in (*weights.w13, *weights.w2)]
    new13, new2 = _expert_weights(s, d, i, seed=6)
    for slot in (0, 2):
        w13[slot].copy_(new13[slot])
        w2[slot].copy_(new2[slot])
    updated = gemm.prepare_slots(weights, w13, w2, [0, 2])
    fresh = gemm.prepare(w13, w2)
    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t

    for got, want, old in zip((*updated.w13, *updated.w2), (*fresh.w13, *fresh.w2), before, strict=True):
        assert torch.equal(bits(got), bits(want))
        for slot in (1, 3):
            assert torch.equal(bits(got[slot]), bits(old[slot]))
    for got, old in ((updated.w13[0], before[0]), (updated.w2[0], before[2])):  # the weights (scales may repeat)
        assert not torch.equal(bits(got[0]), bits(old[0])) and not torch.equal(bits(got[2]), bits(old[2]))
