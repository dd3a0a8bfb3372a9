"""DeepEP dispatch/combine: normal mode (prefill; NVLink within a node, RDMA across nodes; contiguous layout) and
low-latency mode (decode; RDMA/IBGDA; masked layout with a fixed per-rank token budget).

Legend: T local tokens, K experts per token, D hidden, P physical slots (DeepEP's "experts"), S = P / ep_size local
slots, R tokens this rank received in normal mode (one per source token that chose any of its slots),
N (token, local slot) pairs, C = num_max_dispatch_tokens_per_rank * ep_size rows per slot in low-latency mode.

DeepEP places expert e on rank e // S, which is exactly how `ExpertPlacement` places physical slots, so the slots
go to DeepEP as its `topk_idx` unchanged. DeepEP moves bf16 activations: other dtypes are cast to bf16 for the
wire and back to x's dtype in `Received` and in combine's result (no-ops for a bf16 model).

Where the routing weights are applied:
- normal mode sends a token once per destination rank, with all K (slot, weight) pairs; on the receiver a slot held
  elsewhere reads -1 and the others read as local slot indices. Its combine only sums what the ranks send back. So
  this rank expands each received token into one row per local slot it chose (`expand_received`) and, after the
  experts, sums those rows back into one per received token with the weights, in float32 (`reduce_pairs`); combine
  then adds the per-rank partial sums, which travel as bf16 (DeepEP accumulates in float32 and returns bf16).
- low-latency mode sends one row per (token, slot) into that slot's window of C rows, and its combine applies the
  weights itself (weighted sum, float32 accumulation, -1 entries skipped), given the same topk ids and weights.

What DeepEP's low-latency kernels accept, checked here when the dispatcher is built, because DeepEP itself fails only
at the first decode dispatch, with a bare AssertionError (or, for a budget past its counters, not reliably at all):
- the per-rank budget B <= 1024: its kernels count tokens against FINISHED_SUM_TAG = 1024
  (csrc/kernels/internode_ll.cu; SGLang asserts the same bound);
- ep_size * B a multiple of 4 ("TMA requires the number of tokens to be multiple of 4", csrc/deep_ep.cpp);
- D one of the hidden sizes the kernels are compiled for (SWITCH_HIDDEN, csrc/kernels/launch.cuh);
- NVSHMEM_QP_DEPTH >= 2 * (B + 1) (deep_ep/buffer.py reads it, default 1024, before NVSHMEM starts, and asserts
  this in `low_latency_dispatch`).
The RDMA buffer grows linearly with B: ~4 * P * B * 2D bytes (csrc/config.hpp's LowLatencyLayout), so for
DeepSeek-V3 (P = 256, D = 7168) ~1.8 GiB per rank at B = 128 and ~28 GiB at B = 2048.

DeepEP's destructor can hang at interpreter exit: buffers are made with `explicitly_destroy=True` where the installed
DeepEP takes it, and `close()` destroys them, on every rank together (DeepEP's destroy() is a barrier).
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

from moemesh.ep.dispatch import Dispatcher, Received, Stages
from moemesh.ep.placement import ExpertPlacement

MODES = ("auto", "normal", "low_latency")

LOW_LATENCY_HIDDEN = (2048, 2560, 4096, 5120, 6144, 7168, 8192)  # DeepEP's SWITCH_HIDDEN (3072 only in newer builds)
LOW_LATENCY_MAX_BUDGET = 1024  # DeepEP's FINISHED_SUM_TAG
QP_DEPTH_ENV = "NVSHMEM_QP_DEPTH"
DEFAULT_QP_DEPTH = 1024  # what DeepEP's Buffer takes when the variable is unset


# ---- receiver-side bookkeeping of normal mode (plain torch) --------------------------------------------------------

def expand_received(recv_topk_idx: torch.Tensor, recv_topk_weights: torch.Tensor, num_local_slots: int,
                    num_pairs: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row per (received token, local slot it chose), sorted by slot, tokens in received order within a slot.

    recv_topk_idx [R, K] int local slot or -1; recv_topk_weights [R, K] float32; `num_pairs`: N when known on the
    host (DeepEP returns the per-slot counts), else counted here with one device sync.
    Returns (token [N] int64 row of the received tokens, slot [N] int64, weight [N] float32).
    """
    k = recv_topk_idx.shape[1]
    idx = recv_topk_idx.long().reshape(-1)
    valid = idx >= 0
    if num_pairs is None:
        num_pairs = int(valid.sum().item())
    # A sort rather than nonzero(): with N known on the host no sync is needed, and the rows come out slot-sorted.
    key = torch.where(valid, idx, torch.full_like(idx, num_local_slots))
    sorted_slots, flat = torch.sort(key, stable=True)
    flat = flat[:num_pairs]
    weight = recv_topk_weights.reshape(-1).float().index_select(0, flat)
    return torch.div(flat, max(k, 1), rounding_mode="floor"), sorted_slots[:num_pairs], weight


def reduce_pairs(y: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """y [N, D] expert outputs, token [N], weight [N] float32 -> [num_tokens, D] float32 weighted sums per token."""
    out = torch.zeros(num_tokens, y.shape[1], dtype=torch.float32, device=y.device)
    return out.index_add_(0, token, y.float() * weight.unsqueeze(1))


# ---- construction checks -------------------------------------------------------------------------------------------

def _load_deep_ep() -> ModuleType:
    try:
        return importlib.import_module("deep_ep")
    except Exception as e:  # a broken build raises more than ImportError (missing .so symbols, NVSHMEM, CUDA)
        raise RuntimeError(f"dispatcher 'deepep' needs the deep_ep package (DeepEP built for this CUDA, torch and "
                           f"NVSHMEM), which cannot be imported: {type(e).__name__}: {e}; "
                           f"use dispatcher 'all_to_all' instead") from e


def _require_cuda_nccl(group: dist.ProcessGroup | None) -> None:
    """DeepEP runs on CUDA devices of an NCCL group (a seam for tests)."""
    if not torch.cuda.is_available():
        raise RuntimeError("dispatcher 'deepep' needs CUDA GPUs and torch sees none; "
                           "use dispatcher 'all_to_all' instead")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("dispatcher 'deepep' needs an initialized torch.distributed NCCL process group; "
                           "call init_process_group('nccl', ...) first, or use dispatcher 'all_to_all'")
    backend = str(dist.get_backend(group))
    if "nccl" not in backend:
        raise RuntimeError(f"dispatcher 'deepep' needs an NCCL process group, this one is {backend!r}; "
                           f"use dispatcher 'all_to_all' (gloo on CPU) instead")


def check_low_latency_budget(budget: int, ep_size: int) -> None:
    """ValueError unless DeepEP's low-latency kernels take `budget` tokens per rank on `ep_size` ranks."""
    fix = "lower --ep-low-latency-budget (EPConfig.ll_budget; the default, 128, fits any group)"
    if budget > LOW_LATENCY_MAX_BUDGET:
        raise ValueError(f"DeepEP low-latency budget {budget} tokens per rank exceeds {LOW_LATENCY_MAX_BUDGET} "
                         f"(its kernels count tokens against FINISHED_SUM_TAG = 1024); {fix}")
    if ep_size * budget % 4:
        raise ValueError(f"DeepEP low-latency budget {budget} on {ep_size} ranks: ep_size * budget = "
                         f"{ep_size * budget} must be a multiple of 4 (DeepEP's TMA copies need it); "
                         f"use a budget that is a multiple of 4")


def check_low_latency_hidden(hidden: int) -> None:
    """ValueError unless DeepEP's low-latency kernels are compiled for hidden size `hidden`."""
    if hidden not in LOW_LATENCY_HIDDEN:
        raise ValueError(f"DeepEP's low-latency kernels are compiled only for hidden sizes "
                         f"{', '.join(map(str, LOW_LATENCY_HIDDEN))}; this model's hidden size is {hidden}; "
                         f"use --ep-dispatcher-mode normal or --ep-dispatcher all_to_all for it")


def ensure_qp_depth(budget: int, environ: MutableMapping[str, str] | None = None) -> int:
    """The NVSHMEM queue-pair depth DeepEP will read for a low-latency `budget`; set it when unset and DeepEP's
    default is too shallow (it must be set before NVSHMEM starts, i.e. before the first Buffer), RuntimeError
    when the environment sets it too shallow."""
    environ = os.environ if environ is None else environ
    needed = 2 * (budget + 1)  # DeepEP's bound: every in-flight write must find a free work-queue slot
    raw = environ.get(QP_DEPTH_ENV)
    if raw is None:
        if needed <= DEFAULT_QP_DEPTH:
            return DEFAULT_QP_DEPTH
        depth = 1 << (needed - 1).bit_length()  # a power of two, as the default is
        environ[QP_DEPTH_ENV] = str(depth)
        return depth
    try:
        depth = int(raw)
    except ValueError:
        raise RuntimeError(f"{QP_DEPTH_ENV}={raw!r} is not an integer; unset it or set it to >= {needed}") from None
    if depth < needed:
        raise RuntimeError(f"{QP_DEPTH_ENV}={depth} is too shallow for DeepEP's low-latency budget of {budget} "
                           f"tokens per rank: DeepEP needs {QP_DEPTH_ENV} >= 2 * (budget + 1) = {needed}; "
                           f"raise {QP_DEPTH_ENV} (or unset it) or lower --ep-low-latency-budget")
    return depth


def _destroy_options(buffer_cls: type) -> dict[str, bool]:
    """`explicitly_destroy=True` where this DeepEP's Buffer takes it (older builds free only in the destructor)."""
    try:
        params = inspect.signature(buffer_cls).parameters
    except (TypeError, ValueError):
        return {}
    return {"explicitly_destroy": True} if "explicitly_destroy" in params else {}


def _non_negative(name: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


# ---- the dispatcher ------------------------------------------------------------------------------------------------

@dataclass
class _NormalHandle:
    handle: Any  # DeepEP's layout of this dispatch; its combine sends back along it
    token: torch.Tensor  # [N] received-token row of each pair
    weight: torch.Tensor  # [N] float32
    num_received: int  # R
    dtype: torch.dtype


@dataclass
class _LowLatencyHandle:
    handle: Any
    topk_idx: torch.Tensor  # [T, K] as dispatched; low-latency combine weights with these
    topk_weights: torch.Tensor  # [T, K] float32
    dtype: torch.dtype


class DeepEPDispatcher(Dispatcher):
    """DeepEP's `Buffer`: normal dispatch/combine (contiguous layout) or low-latency (masked layout).

    mode: "normal" (prefill), "low_latency" (decode), "auto" (normal: a dispatcher serves one phase).
    num_max_dispatch_tokens_per_rank: low-latency mode's fixed budget of tokens a rank may dispatch per call, the
        same on every rank; it sizes the buffer and C (checked now against DeepEP's limits, see the module doc).
    hidden: D; given, the buffer is allocated now (a collective over the group), else at the first dispatch;
        low-latency mode checks it against DeepEP's compiled sizes before allocating.
    num_nvl_bytes, num_rdma_bytes: buffer sizes; None takes DeepEP's size hints for D (bf16).
    num_sms: SMs DeepEP's normal-mode kernels use (even; DeepEP keeps it process-wide).
    """

    def __init__(self, group: dist.ProcessGroup | None, placement: ExpertPlacement, mode: str = "auto",
                 num_max_dispatch_tokens_per_rank: int = 128, hidden: int | None = None,
                 num_nvl_bytes: int | None = None, num_rdma_bytes: int | None = None,
                 num_sms: int | None = None) -> None:
        self._ep = _load_deep_ep()
        _require_cuda_nccl(group)
        super().__init__(group, placement)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        budget = num_max_dispatch_tokens_per_rank
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"num_max_dispatch_tokens_per_rank must be a positive int, got {budget!r}")
        if num_sms is not None and (isinstance(num_sms, bool) or not isinstance(num_sms, int) or num_sms < 2
                                    or num_sms % 2):
            raise ValueError(f"num_sms must be an even int >= 2 (DeepEP's requirement), got {num_sms!r}")
        self.mode = "normal" if mode == "auto" else mode
        self.num_max_dispatch_tokens_per_rank = budget
        self._nvl_bytes = _non_negative("num_nvl_bytes", num_nvl_bytes)
        self._rdma_bytes = _non_negative("num_rdma_bytes", num_rdma_bytes)
        if num_sms is not None:
            self._ep.Buffer.set_num_sms(num_sms)
        # Newer DeepEP builds choose the integer type of top-k ids at compile time and export it.
        self._topk_dtype = getattr(self._ep, "topk_idx_t", torch.int64)
        self._buffer: Any = None
        self._hidden: int | None = None
        self._destroy_kwargs = _destroy_options(self._ep.Buffer)
        self._closed = False
        if self.low_latency:
            check_low_latency_budget(budget, self.ep_size)
        else:
            self._normal_configs()  # DeepEP tunes normal mode per rank count: an unsupported one fails now
        if hidden is not None:
            self._buffer_for(hidden)

    @property
    def low_latency(self) -> bool:
        return self.mode == "low_latency"

    def close(self) -> None:
        """Free the DeepEP buffer. A collective: DeepEP's destroy() meets the other ranks in a barrier, so every rank
        calls it together, and only while the group is healthy (EPGroup.close). Without explicit destruction (older
        DeepEP) the buffer is left to its destructor, as before."""
        buffer, self._buffer, self._closed = self._buffer, None, True
        if buffer is not None and self._destroy_kwargs:
            buffer.destroy()

    def _normal_configs(self) -> tuple[Any, Any]:
        buffer_cls = self._ep.Buffer
        try:
            return buffer_cls.get_dispatch_config(self.ep_size), buffer_cls.get_combine_config(self.ep_size)
        except Exception as e:  # an assert in DeepEP's table of tuned configs
            raise RuntimeError(f"dispatcher 'deepep' has no normal-mode config for {self.ep_size} ranks "
                               f"({type(e).__name__}: {e}); use dispatcher 'all_to_all' instead") from e

    def _buffer_for(self, hidden: int) -> Any:
        """The DeepEP buffer, allocated at the first call on every rank together (it exchanges IPC handles)."""
        if self._buffer is not None:
            if hidden != self._hidden:
                raise ValueError(f"the DeepEP buffer was sized for hidden {self._hidden}, got hidden {hidden}")
            return self._buffer
        if self._closed:
            raise RuntimeError("this DeepEP dispatcher was closed")
        if self.low_latency:
            check_low_latency_hidden(hidden)
            ensure_qp_depth(self.num_max_dispatch_tokens_per_rank)
        buffer_cls, ranks = self._ep.Buffer, self.ep_size
        group = self.group if self.group is not None else dist.group.WORLD
        try:
            if self.low_latency:
                rdma = self._rdma_bytes
                if rdma is None:
                    rdma = buffer_cls.get_low_latency_rdma_size_hint(self.num_max_dispatch_tokens_per_rank, hidden,
                                                                     ranks, self.placement.num_physical)
                # DeepEP's docs ask low-latency mode for one RDMA queue pair per local expert.
                buffer = buffer_cls(group, self._nvl_bytes or 0, rdma, low_latency_mode=True,
                                    num_qps_per_rank=self.placement.slots_per_rank, **self._destroy_kwargs)
            else:
                configs = self._normal_configs()
                hidden_bytes = hidden * 2  # bf16
                nvl = self._nvl_bytes
                if nvl is None:
                    nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, ranks) for c in configs)
                rdma = self._rdma_bytes
                if rdma is None:
                    rdma = max(c.get_rdma_buffer_size_hint(hidden_bytes, ranks) for c in configs)
                buffer = buffer_cls(group, nvl, rdma, **self._destroy_kwargs)
        except Exception as e:  # DeepEP asserts on unsupported rank counts and fails on NVSHMEM/IPC set-up
            raise RuntimeError(f"dispatcher 'deepep' could not set up its {self.mode} buffer for {ranks} ranks, "
                               f"hidden {hidden}: {type(e).__name__}: {e}; use dispatcher 'all_to_all' "
                               f"instead") from e
        self._buffer, self._hidden = buffer, hidden
        return buffer

    def _inputs(self, x: torch.Tensor, phys_ids: torch.Tensor, weights: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        topk_idx = phys_ids.to(device=x.device, dtype=self._topk_dtype).contiguous()
        topk_weights = weights.to(device=x.device, dtype=torch.float32).contiguous()
        return x.to(torch.bfloat16).contiguous(), topk_idx, topk_weights

    def dispatch_stages(self, x: torch.Tensor, phys_ids: torch.Tensor, weights: torch.Tensor
                        ) -> Stages[tuple[Received, Any]]:
        """x [T, D], phys_ids [T, K] int64 (-1: none), weights [T, K] float32 -> (contiguous or masked, handle)."""
        if self.low_latency:
            return (yield from self._dispatch_low_latency(x, phys_ids, weights))
        return (yield from self._dispatch_normal(x, phys_ids, weights))

    def combine_stages(self, y: torch.Tensor, handle: Any) -> Stages[torch.Tensor]:
        """y [N, D] (normal) or [S, C, D] (low latency) -> [T, D] weighted sums in the dispatched x's dtype."""
        if isinstance(handle, _LowLatencyHandle):
            return (yield from self._combine_low_latency(y, handle))
        return (yield from self._combine_normal(y, handle))

    # ---- normal mode --------------------------------------------------------------------------------------------

    def _dispatch_normal(self, x: torch.Tensor, phys_ids: torch.Tensor, weights: torch.Tensor
                         ) -> Stages[tuple[Received, _NormalHandle]]:
        buffer = self._buffer_for(x.shape[1])
        xb, topk_idx, topk_weights = self._inputs(x, phys_ids, weights)
        # DeepEP works on its own stream: it must first wait for the compute stream that produced x and the routing.
        ready = buffer.capture()
        per_rank, per_rdma_rank, per_slot, in_rank, laid_out = buffer.get_dispatch_layout(
            topk_idx, self.placement.num_physical, previous_event=ready, async_finish=True,
            allocate_on_comm_stream=True)
        # Returns once the counts are known on the host (DeepEP waits for them); the payload is still moving.
        recv_x, recv_idx, recv_weights, counts, layout, sent = buffer.dispatch(
            xb, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_slot,
            previous_event=laid_out, async_finish=True, allocate_on_comm_stream=True)
        yield
        sent.current_stream_wait()
        token, slot, weight = expand_received(recv_idx, recv_weights, self.placement.slots_per_rank, sum(counts))
        handle = _NormalHandle(layout, token, weight, recv_x.shape[0], x.dtype)
        return Received(recv_x.index_select(0, token).to(x.dtype), slots=slot), handle

    def _combine_normal(self, y: torch.Tensor, handle: _NormalHandle) -> Stages[torch.Tensor]:
        buffer = self._buffer
        partial = reduce_pairs(y, handle.token, handle.weight, handle.num_received).to(torch.bfloat16)
        ready = buffer.capture()
        combined, _, summed = buffer.combine(partial, handle.handle, previous_event=ready, async_finish=True,
                                             allocate_on_comm_stream=True)
        yield
        summed.current_stream_wait()
        return combined.to(handle.dtype)

    # ---- low-latency mode ---------------------------------------------------------------------------------------

    def _dispatch_low_latency(self, x: torch.Tensor, phys_ids: torch.Tensor, weights: torch.Tensor
                              ) -> Stages[tuple[Received, _LowLatencyHandle]]:
        budget = self.num_max_dispatch_tokens_per_rank
        if x.shape[0] > budget:
            # Raised before any communication: the scheduler must cap a decode batch at the budget.
            raise ValueError(f"DeepEP low-latency dispatch of {x.shape[0]} tokens exceeds "
                             f"num_max_dispatch_tokens_per_rank = {budget}; cap the batch or raise the budget "
                             f"(the same on every rank)")
        buffer = self._buffer_for(x.shape[1])
        xb, topk_idx, topk_weights = self._inputs(x, phys_ids, weights)
        # bf16 on the wire: the grouped GEMM gets activations in the dtype `Received` promises and quantizes itself.
        # With the hook, the kernel only issues the sends; the hook receives. Between the two the caller computes.
        recv_x, recv_count, layout, _, receive = buffer.low_latency_dispatch(
            xb, topk_idx, budget, self.placement.num_physical, use_fp8=False, async_finish=False,
            return_recv_hook=True)
        yield
        receive()
        handle = _LowLatencyHandle(layout, topk_idx, topk_weights, x.dtype)
        return Received(recv_x.to(x.dtype), counts=recv_count.to(torch.int64)), handle

    def _combine_low_latency(self, y: torch.Tensor, handle: _LowLatencyHandle) -> Stages[torch.Tensor]:
        # DeepEP keeps two low-latency buffers and alternates: at most two micro-batches may be in flight (TBO's two).
        combined, _, receive = self._buffer.low_latency_combine(
            y.to(torch.bfloat16).contiguous(), handle.topk_idx, handle.topk_weights, handle.handle,
            async_finish=False, return_recv_hook=True)
        yield
        receive()
        return combined.to(handle.dtype)
