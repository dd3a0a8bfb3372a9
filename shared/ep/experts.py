"""Expert-parallel routed experts: this rank's slots' weights, dispatch, a grouped GEMM, combine.

Legend: T local tokens, K experts per token, D hidden, I expert intermediate size, S local slots,
N (token, expert) pairs received by this rank, C rows per slot in the masked layout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from moemesh.ep.backends import GEMMS
from moemesh.ep.dispatch import Dispatcher, Stages, run_stages
from moemesh.ep.placement import ExpertPlacement
from moemesh.model.fp8 import Fp8Experts
from moemesh.model.layers import silu_and_mul
from moemesh.model.moe import RoutedExperts


class GroupedGemm(ABC):
    """The SwiGLU expert MLP over rows grouped by local slot, in the two layouts dispatchers produce."""

    def prepare(self, w13: torch.Tensor, w2: torch.Tensor) -> Any:
        """Once per layer at start-up: w13 [S, 2I, D], w2 [S, D, I] -> the weights in this backend's form."""
        return w13, w2

    def prepare_slots(self, weights: Any, w13: torch.Tensor, w2: torch.Tensor, slots: list[int]) -> Any:
        """After a placement switch wrote local slots `slots` of w13 [S, 2I, D] and w2 [S, D, I] (between two
        forwards): `weights` (this backend's form, from `prepare`) brought up to date. This form prepares the whole
        layer again; a backend whose form copies the weights redoes only the slots written, so that a switch costs
        the step thread what it moved, not the layer."""
        return self.prepare(w13, w2)

    def prepare_fp8(self, experts: Fp8Experts) -> Any:
        """Once per layer at start-up, for experts kept in FP8 with block scales -> this backend's form."""
        raise ValueError(f"grouped GEMM {type(self).__name__} does not take FP8 experts; use grouped GEMM 'torch' "
                         f"(converts one expert at a time) or 'deepgemm' (consumes them on a Hopper GPU)")

    @abstractmethod
    def contiguous(self, xs: torch.Tensor, counts: list[int], weights: Any) -> torch.Tensor:
        """xs [N, D] sorted by slot, counts [S] rows per slot -> [N, D] in xs' dtype."""

    @abstractmethod
    def masked(self, xs: torch.Tensor, counts: torch.Tensor, weights: Any) -> torch.Tensor:
        """xs [S, C, D], counts [S] int64 valid rows per slot -> [S, C, D] (rows past a count are garbage)."""


class TorchGroupedGemm(GroupedGemm):
    """Plain torch: one matmul pair per slot that received rows (contiguous); batched matmuls (masked).

    FP8 experts: each slot with rows is converted to the activations' dtype when it computes (the masked layout
    then also goes slot by slot: converting every slot at once would hold all of them in 16 bits).
    """

    def prepare_fp8(self, experts: Fp8Experts) -> Fp8Experts:
        return experts

    def contiguous(self, xs: torch.Tensor, counts: list[int], weights: Any) -> torch.Tensor:
        out = torch.empty_like(xs)
        start = 0
        for s, n in enumerate(counts):
            if n:
                w13, w2 = _slot(weights, s, xs.dtype)
                seg = xs[start:start + n]
                out[start:start + n] = silu_and_mul(seg @ w13.t()) @ w2.t()
                start += n
        return out

    def masked(self, xs: torch.Tensor, counts: torch.Tensor, weights: Any) -> torch.Tensor:
        if isinstance(weights, Fp8Experts):
            out = torch.empty_like(xs)
            for s, n in enumerate(counts.tolist()):
                if n:
                    w13, w2 = weights.expert(s, xs.dtype)
                    out[s, :n] = silu_and_mul(xs[s, :n] @ w13.t()) @ w2.t()
            return out
        w13, w2 = weights
        return torch.bmm(silu_and_mul(torch.bmm(xs, w13.transpose(1, 2))), w2.transpose(1, 2))


def _slot(weights: Any, s: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot s's (w13 [2I, D], w2 [D, I]) from TorchGroupedGemm's weights, FP8 ones converted to `dtype`."""
    if isinstance(weights, Fp8Experts):
        return weights.expert(s, dtype)
    return weights[0][s], weights[1][s]


def held_bytes(form: Any, tensors: list[torch.Tensor]) -> int:
    """Bytes of the tensors found in `form` (through its tuples, lists and attributes) that are not views of
    `tensors`: what a grouped GEMM's form holds beyond the slot tensors it was made of."""
    own = {t.untyped_storage().data_ptr() for t in tensors}
    counted: set[int] = set()
    visited: set[int] = set()
    total = 0

    def walk(x: Any) -> None:
        nonlocal total
        if id(x) in visited:
            return
        visited.add(id(x))
        if isinstance(x, torch.Tensor):
            try:
                key = x.untyped_storage().data_ptr()
            except NotImplementedError:  # an opaque tensor (oneDNN's packed layout) has a storage of its own
                key = id(x)
            if key not in own and key not in counted:
                counted.add(key)
                total += x.numel() * x.element_size()
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        elif hasattr(x, "__dict__") and not isinstance(x, (nn.Module, type)):
            for y in vars(x).values():
                walk(y)

    walk(form)
    return total


def make_grouped_gemm(name: str) -> GroupedGemm:
    """The grouped GEMM backend `name` (registered in `moemesh.ep.backends`). Fails now if it cannot run."""
    return GEMMS.load(name)()


class EPExperts(nn.Module):
    """Drop-in for `RoutedExperts` in an EP group: holds only this rank's slots, `w13` [S, 2I, D], `w2` [S, D, I].

    `layer` is the MoE layer's index among MoE layers (the placement's L axis).
    """

    def __init__(self, experts: RoutedExperts, layer: int, placement: ExpertPlacement, dispatcher: Dispatcher,
                 gemm: GroupedGemm | str = "torch") -> None:
        super().__init__()
        slots = placement.local_slots(dispatcher.rank)
        logical = [int(e) for e in placement.phy2log[layer, slots.start:slots.stop]]
        if experts.logical_ids is not None:  # loaded as this rank's share already: taken as they are
            if experts.logical_ids != logical:
                raise ValueError(f"MoE layer {layer}: the loaded experts {experts.logical_ids[:8]}... are not this "
                                 f"rank's slots {logical[:8]}... under the placement")
        elif experts.num_experts != placement.num_logical:
            raise ValueError(f"placement has {placement.num_logical} logical experts, the layer has "
                             f"{experts.num_experts}")
        self.layer = layer
        self.placement = placement
        self.dispatcher = dispatcher
        self.gemm = make_grouped_gemm(gemm) if isinstance(gemm, str) else gemm
        self.num_experts = placement.num_logical
        self.num_local_slots = len(slots)
        self.fp8_block = experts.fp8_block
        names = self._slot_tensor_names()
        if experts.logical_ids is None:
            index = torch.tensor(logical, dtype=torch.int64, device=experts.w13.device)
        for name in names:
            t = getattr(experts, name).detach()
            t = t if experts.logical_ids is not None else t.index_select(0, index)
            if name in ("w13", "w2"):
                setattr(self, name, nn.Parameter(t, requires_grad=False))
            else:
                self.register_buffer(name, t)
        self._weights = self._prepare()

    def _slot_tensor_names(self) -> tuple[str, ...]:
        """The tensors with one row per local slot: the weights, and their block scales when kept in FP8."""
        return ("w13", "w2") if self.fp8_block is None else ("w13", "w2", "w13_scale_inv", "w2_scale_inv")

    def slot_tensors(self) -> list[torch.Tensor]:
        """Everything a slot's expert is made of, each [S, ...] (what moving an expert between ranks moves)."""
        return [getattr(self, n).data for n in self._slot_tensor_names()]

    def _prepare(self) -> Any:
        return self.prepare_form(self.slot_tensors())

    def prepare_form(self, tensors: list[torch.Tensor]) -> Any:
        """The grouped GEMM's form of slot tensors `tensors` (as `slot_tensors` lists them: w13 [S, 2I, D],
        w2 [S, D, I] and, for FP8 experts, their scales). Reads only `tensors`: a placement switch calls it on its
        copy thread for the layer's next weights while the layer serves its current ones."""
        if self.fp8_block is None:
            return self.gemm.prepare(tensors[0], tensors[1])
        return self.gemm.prepare_fp8(Fp8Experts(*tensors, self.fp8_block))

    def form_bytes(self, form: Any = None, tensors: list[torch.Tensor] | None = None) -> int:
        """Bytes the grouped GEMM's form (`form` made of `tensors`; default: the layer's own) holds beyond the slot
        tensors: oneDNN's packed copies, DeepGEMM's FP8 copy of 16-bit weights; 0 where it serves the tensors."""
        if form is None:
            form, tensors = self._weights, self.slot_tensors()
        return held_bytes(form, tensors or [])

    def set_weights(self, placement: ExpertPlacement, *tensors: torch.Tensor) -> None:
        """Serve `placement` from now on, with `tensors` (as `slot_tensors` lists them: w13 [S, 2I, D], w2 [S, D, I]
        and, for FP8 experts, their scales) its slots' experts on this rank."""
        self._replace([t.contiguous() for t in tensors])
        self._weights = self._prepare()
        self.placement = placement

    def swap_layer(self, placement: ExpertPlacement, tensors: list[torch.Tensor], form: Any) -> list[Any]:
        """Serve `placement` from now on with the layer's slot tensors replaced by `tensors` (contiguous, as
        `slot_tensors` lists them) and the grouped GEMM's form by `form` (`prepare_form` of them): a pointer swap,
        between two forwards only. Returns what it replaced, for the caller to keep alive until the device has
        finished the forwards queued before the swap."""
        old = [*self.slot_tensors(), self._weights]
        self._replace(tensors)
        self._weights = form
        self.placement = placement
        return old

    def _replace(self, tensors: list[torch.Tensor]) -> None:
        mine = self.slot_tensors()
        if len(tensors) != len(mine) or any(t.shape != m.shape or t.dtype != m.dtype or t.device != m.device
                                            for t, m in zip(tensors, mine, strict=True)):
            raise ValueError(f"weights of shapes {[tuple(t.shape) for t in tensors]} do not fit this layer's "
                             f"{[tuple(m.shape) for m in mine]}")
        with torch.no_grad():
            for name, t in zip(self._slot_tensor_names(), tensors, strict=True):
                getattr(self, name).data = t

    def switch_slots(self, placement: ExpertPlacement, slots: list[int], rows: torch.Tensor | None) -> None:
        """Serve `placement` from now on, local slots `slots` holding the experts staged in `rows` [M, W] uint8
        (each row: the slot's tensors' bytes, in `slot_tensors` order; None where `slots` is empty). Between two
        forwards only: the weights and the routing table change together, so no token meets a slot whose weights
        and map disagree.

        The staged rows are copied into the layer's own tensors (a local copy of the moved slots only, what the
        staging bound bounds); a backend holding its own form of the weights prepares it again (`prepare_slots`)."""
        if slots:
            if rows.is_cuda:  # made on the copy thread's stream: not to be reused before this stream has read it
                rows.record_stream(torch.cuda.current_stream(rows.device))
            base = 0
            with torch.no_grad():
                for t in self.slot_tensors():
                    view = t.reshape(t.shape[0], -1).view(torch.uint8)  # [S, W_t], the same memory
                    # A copy per slot: each is one contiguous memcpy, where index_copy_ over uint8 rows of megabytes
                    # ran ~9x slower on a CPU (6 slots of 3 MiB: 15-18 ms against 1.7 ms), inside the boundary.
                    for j, slot in enumerate(slots):
                        view[slot].copy_(rows[j, base:base + view.shape[1]])
                    base += view.shape[1]
            if base != rows.shape[1]:
                raise ValueError(f"staged rows of {rows.shape[1]} bytes do not fit this layer's {base}-byte slots")
            self._weights = self._prepare() if self.fp8_block is not None else \
                self.gemm.prepare_slots(self._weights, self.w13, self.w2, slots)
        self.placement = placement

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, D]; topk_ids [T, K] int64 logical experts; topk_weights [T, K] float32 -> [T, D] in x's dtype."""
        return run_stages(self.stages(x, topk_ids, topk_weights))

    def stages(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Stages[torch.Tensor]:
        """`forward` as a stage generator: it yields while its dispatch or combine is in flight."""
        phys = self.placement.physical_ids(self.layer, topk_ids)
        received, handle = yield from self.dispatcher.dispatch_stages(x, phys, topk_weights)
        y = self._compute(received)
        return (yield from self.dispatcher.combine_stages(y, handle))

    def _compute(self, r: Any) -> torch.Tensor:
        if r.masked:
            return self.gemm.masked(r.x, r.counts, self._weights)
        order = torch.argsort(r.slots, stable=True)
        counts = torch.bincount(r.slots, minlength=self.num_local_slots).tolist()
        out_sorted = self.gemm.contiguous(r.x.index_select(0, order), counts, self._weights)
        y = torch.empty_like(r.x)
        y[order] = out_sorted
        return y

    def extra_repr(self) -> str:
        return f"layer={self.layer}, local_slots={self.num_local_slots}, rank={self.dispatcher.rank}"
