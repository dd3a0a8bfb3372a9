"""The background half of a placement switch: a thread that stages the switch's rounds one at a time, over the
switch's own process group, while the engine thread keeps serving and switches each staged round in.

The thread plans a layer's rounds when it reaches the layer (from the layer's row as it serves then), stages
the next round, and waits until the engine thread has switched it before staging another: one round's
buffers at a time, so the staging bound holds. Its copies are paced by credits the engine thread gives at
each busy step boundary (one chunk call per credit) so that a serving step is never held up for long; while
the group is idle the engine thread lets it run free and waits for it.

Where the staging bound holds a layer's local experts, a round is staged as a whole new copy of the layer and its
grouped GEMM's form is prepared here too, so the engine thread only swaps pointers at the boundary.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from moemesh.device import bind_thread, lower_thread_to_idle
from moemesh.ep.experts import EPExperts
from moemesh.ep.migrate import Staged, slot_width, stage_round
from moemesh.ep.move_plan import Round, plan_layer
from moemesh.ep.placement import ExpertPlacement

log = logging.getLogger(__name__)


class SwitchCancelled(Exception):
    """The group is leaving or gave the switch up: the thread stops where it waits."""


class Stager:
    """Stages the rounds from `current` (phy2log [L, P], what the layers serve) to `new` for this rank.

    State read by the engine thread: `staged` (rounds staged and agreed by every rank), `failed` (a round failed
    on some rank: agreed too, or this rank's collective broke), `peak_bytes` (the largest round's staging).
    """

    def __init__(self, experts: list[EPExperts], current: torch.Tensor, new: ExpertPlacement, rank: int,
                 group: dist.ProcessGroup | None, max_staging_bytes: int, chunk_bytes: int,
                 fault: Callable[[Round], None] | None = None) -> None:
        self.experts, self.new, self.rank, self.group = experts, new, rank, group
        self.rows = current.clone()  # [L, P] what each layer serves once the rounds staged so far are switched
        self.max_staging_bytes, self.chunk_bytes, self.fault = max_staging_bytes, chunk_bytes, fault
        self.staged = 0
        self.failed = False
        self.peak_bytes = 0
        self.over_bound_rounds = 0
        self._switched = 0
        self._ready: tuple[Staged, ExpertPlacement, bool] | None = None  # (round, placement after it, the last)
        self._replaced: list[Any] | None = None  # what the last swap replaced (CPU), for the next round's buffer
        self._credits = 0
        self._free = False
        self._cancel = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"ep-switch-rank{rank}", daemon=True)
        self._thread.start()

    # ---- the engine thread ------------------------------------------------------------------------------------

    def allow(self, credits: int = 1) -> None:
        """A busy step boundary: the thread may make one more chunk call (credits do not pile up while it waits
        for a switch, so a burst never follows a long wait)."""
        with self._cond:
            self._credits = min(self._credits + credits, credits)
            self._cond.notify_all()

    def run_free(self, free: bool) -> None:
        """Idle group: copy without waiting for credits (the engine thread waits for the round meanwhile)."""
        with self._cond:
            self._free = free
            self._cond.notify_all()

    def wait_staged(self, count: int) -> bool:
        """Block until `count` rounds are staged (True) or the switch failed (False)."""
        with self._cond:
            self._cond.wait_for(lambda: self.staged >= count or self.failed)
            return self.staged >= count

    def take(self) -> tuple[Staged, ExpertPlacement, bool]:
        """The staged round to switch in now (staged, the placement the layer serves after it, whether the whole
        switch is then done); `switched` says when it is in."""
        with self._cond:
            ready, self._ready = self._ready, None
            if ready is None:
                raise RuntimeError("no staged round to switch in")
            return ready

    def switched(self, replaced: list[Any] | None = None) -> None:
        """The round taken is in; the thread stages the next one. `replaced`: what a swap replaced on a CPU (the
        layer's former slot tensors, then its GEMM form), nothing reads it any more: the thread stages the next
        layer into those tensors (the same shapes in every layer: no fresh pages to fault in) and frees the rest,
        off the step thread."""
        with self._cond:
            self._switched += 1
            if replaced is not None:
                self._replaced = replaced
            self._cond.notify_all()

    def cancel(self, timeout_s: float = 30.0) -> None:
        """Stop the thread and wait for it (a chunk call already made on every rank finishes first)."""
        with self._cond:
            self._cancel = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("EP rank %d: the switch's copy thread did not stop within %.0f s", self.rank, timeout_s)

    def join(self) -> None:
        self._thread.join()

    # ---- the thread -------------------------------------------------------------------------------------------

    def _turn(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._cancel or self._free or self._credits > 0)
            if self._cancel:
                raise SwitchCancelled
            if not self._free:
                self._credits -= 1

    def _run(self) -> None:
        try:
            device = self.experts[0].slot_tensors()[0].device
            bind_thread(device)
            if device.type == "cuda":
                # A stream of its own: the copies overlap the serving kernels instead of queueing behind them.
                with torch.cuda.stream(torch.cuda.Stream(device)):
                    self._stage_all()
            else:
                lower_thread_to_idle()  # its planning and buffer copies share the serving step's core
                self._stage_all()
        except SwitchCancelled:
            return
        except Exception:  # a broken collective: the vote tells every rank, serving goes on
            log.exception("EP rank %d: the placement switch's copies failed", self.rank)
            with self._cond:
                self.failed = True
                self._cond.notify_all()

    def _stage_all(self) -> None:
        num_layers = len(self.experts)
        for layer, experts in enumerate(self.experts):
            parts = experts.slot_tensors()
            width, num_slots = slot_width(parts), parts[0].shape[0]
            # A bound that holds this rank's whole layer: each round staged into a copy of it, swapped in at the
            # boundary (nothing copied on the step thread); the layer's changes then go in as few rounds as the
            # chains allow. Else the changed slots' rows, as many as the bound holds, copied in at the boundary.
            whole = num_slots * width + experts.form_bytes() <= self.max_staging_bytes  # the copy and its form
            per_rank_slots = num_slots if whole else max(1, self.max_staging_bytes // max(1, width))
            rounds = plan_layer(layer, self.rows[layer].tolist(), self.new.phy2log[layer].tolist(),
                                self.new.ep_size, per_rank_slots)
            for rnd in rounds:
                staged = stage_round(rnd, parts, self.rank, self.new.ep_size, self.group, self.chunk_bytes,
                                     self._turn, self.fault, whole_layer=whole, buffer=self._spare(parts))
                if not staged.ok:
                    with self._cond:
                        self.failed = True
                        self._cond.notify_all()
                    return
                if staged.layer is not None:  # the GEMM's form of the new layer (packing, FP8 scales) made here too
                    staged.form = experts.prepare_form(staged.layer)
                    staged.form_bytes = experts.form_bytes(staged.form, staged.layer)
                self.rows[layer] = torch.tensor(rnd.row, dtype=torch.int64)
                done = layer == num_layers - 1 and rnd.last_of_layer
                after = self.new if done else ExpertPlacement(self.rows.clone(), self.new.ep_size,
                                                              self.new.num_logical)
                after._tables(parts[0].device)  # routing tables on the device now, not in the serving step
                if parts[0].is_cuda:
                    torch.cuda.current_stream(parts[0].device).synchronize()  # ready for the serving stream
                with self._cond:
                    self.peak_bytes = max(self.peak_bytes, staged.nbytes)
                    self.over_bound_rounds += int(rnd.over_bound)
                    self._ready = (staged, after, done)
                    self.staged += 1
                    self._cond.notify_all()
                    # One round's buffers at a time: the next is staged once this one is switched in.
                    self._cond.wait_for(lambda: self._cancel or self._switched == self.staged)
                    if self._cancel:
                        return
                parts = experts.slot_tensors()  # the layer's tensors as they serve now
        with self._cond:
            self._replaced = None  # the last layer's former tensors: freed here, not by the step thread

    def _spare(self, parts: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The tensors the last swap replaced, to stage into when they fit `parts` (else freed, here)."""
        with self._cond:
            replaced, self._replaced = self._replaced, None
        if replaced is None:
            return None
        tensors = replaced[:len(parts)]
        fits = all(isinstance(t, torch.Tensor) and t.shape == p.shape and t.dtype == p.dtype and t.device == p.device
                   for t, p in zip(tensors, parts, strict=True))
        return tensors if fits else None
