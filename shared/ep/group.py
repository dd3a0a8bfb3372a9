"""One rank's membership in an EP group: the process group, the expert placement, and the per-step vote.

All ranks of a group step together: before each step every rank says whether it has a batch, whether
its batch can be split for two-batch overlap, and whether it is stopping; one all-reduce tells all of
them whether anyone has work (then everyone runs a forward, empty if need be), whether to split, and
whether the whole group is stopping. A peer that dies makes the next collective fail on every other
rank (gloo and NCCL notice the closed connection); a peer that hangs fails it after `timeout_s`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moemesh.device import bind_thread, new_threads_idle
from moemesh.ep.apply import apply_expert_parallel
from moemesh.ep.migrate import slot_width
from moemesh.ep.move_plan import Round
from moemesh.ep.placement import ExpertPlacement
from moemesh.ep.stager import Stager
from moemesh.model.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EPConfig:
    """How a process joins its EP group."""

    size: int = 1
    rank: int = 0
    init_addr: str = ""              # host:port where rank 0 hosts the rendezvous
    redundant_experts: int = 0
    placement_file: str | None = None
    dispatcher: str = "all_to_all"
    dispatcher_mode: str = "auto"    # deepep: "normal" (prefill), "low_latency" (decode)
    ll_budget: int = 128             # deepep low latency: most tokens per rank and step (its buffers grow with it)
    gemm: str = "torch"
    enable_tbo: bool = False
    timeout_s: float = 120.0
    device: str = "cpu"              # this rank's device ("cuda:N": its GPU, bound before joining the group)
    max_staging_mb: float = 256.0    # a placement switch stages at most this much at once (a layer, or moved slots)
    switch_chunk_mb: float = 1.0     # a switch's copies move at most this much per rank and serving step

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"ep size must be >= 1, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"ep rank must be in [0, {self.size}), got {self.rank}")
        if self.redundant_experts < 0:
            raise ValueError(f"redundant experts must be >= 0, got {self.redundant_experts}")
        if self.ll_budget < 1:
            raise ValueError(f"the low-latency budget must be >= 1 token per rank, got {self.ll_budget}")
        if self.max_staging_mb <= 0 or self.switch_chunk_mb <= 0:
            raise ValueError(f"the staging bound and the switch's chunk must be > 0 MB, got {self.max_staging_mb} "
                             f"and {self.switch_chunk_mb}")
        if self.size > 1 and not self.init_addr:
            raise ValueError("an EP group of more than one rank needs the rendezvous address (host:port)")


@dataclass(frozen=True)
class StepVote:
    any_batch: bool      # some rank has a batch: every rank runs a forward this step
    all_can_split: bool  # every rank's batch can run as two micro-batches
    split: bool          # run it as two micro-batches (two-batch overlap is on and all can split)
    all_stopping: bool   # every rank is stopping: leave the loop together
    offered: int = 0     # the newest placement version every rank has been offered (0: none agreed)
    staged: int = 0      # a switch's rounds every rank has staged
    switch_failed: bool = False  # a switch's round failed on some rank: every rank gives the switch up


@dataclass
class Migration:
    """A switch to a new placement in progress: MoE layers before `next_layer` have moved; `rows` [L, P] is what
    each layer serves now (some layers switched, one maybe part-way in whole rounds, the rest not yet)."""

    version: int
    placement: ExpertPlacement
    stager: Stager
    rows: torch.Tensor
    next_layer: int = 0
    received: int = 0
    switched: int = 0    # rounds switched in
    swapped: int = 0     # of them, by a pointer swap of the layer on this rank
    moved_slots: int = 0


class GroupFailed(RuntimeError):
    """A collective of the EP group failed: a peer rank died, hung or left."""


class EPGroup:
    """This process's rank of an EP group (torch.distributed's default group: one group per process)."""

    def __init__(self, cfg: EPConfig) -> None:
        self.cfg = cfg
        self.placement: ExpertPlacement | None = None
        self.placement_version = 0   # 0: the start-up placement; then the balancer's versions
        self.migration: Migration | None = None
        self.last_switch_s = 0.0     # how long the last switch held the step thread, summed over its boundaries
        self.last_switch_longest_s = 0.0  # the longest the last switch held one step boundary
        self.last_staging_bytes = 0  # the largest round the last switch staged on this rank
        self.last_switch_rounds = 0  # rounds the last switch took (at least one a MoE layer)
        self.last_switch_received = 0  # expert weights this rank received from others in the last switch
        self.last_switch_swapped = 0  # rounds of the last switch that replaced a layer by a pointer swap here
        # What swaps replaced on a GPU, with an event after the forwards that may still read it: freed once passed.
        self._retired: list[tuple[Any, list[Any]]] = []
        self.switch_fault: Callable[[Round], None] | None = None  # tests: raise here to fail a round on this rank
        self._offers: dict[int, torch.Tensor] = {}  # version -> phy2log [L, P], offered by the balancer
        self._experts: list = []
        self.max_step_tokens = 0  # tokens one forward of this rank may carry, set by `apply`
        # One backend per device type: gloo carries CPU tensors (the step vote), NCCL CUDA ones.
        device = torch.device(cfg.device)
        gpu = device.type == "cuda"
        options: dict[str, Any] = {}
        if gpu:
            # Bound before the group exists: NCCL's communicator, DeepEP's buffers and IPC handles are made
            # on the current device, which is otherwise GPU 0 for every rank of the host.
            bind_thread(device)
            options["device_id"] = torch.device("cuda", device.index or 0)
        backend = "cpu:gloo,cuda:nccl" if gpu and torch.cuda.is_available() else "gloo"
        if backend == "gloo":
            options.pop("device_id", None)  # binds NCCL's communicator; gloo has none
        dist.init_process_group(backend, init_method=f"tcp://{cfg.init_addr}", rank=cfg.rank,
                                world_size=cfg.size, timeout=datetime.timedelta(seconds=cfg.timeout_s), **options)
        self._vote = torch.zeros(7, dtype=torch.int64)
        # A second group for a switch's copies, so that they never interleave with the serving all-to-alls
        # (collectives of one group run in call order; the copies run in a thread of their own). On CPUs gloo's
        # threads do the copies' work (buffer copies, socket I/O) on the cores the serving steps use: they run at
        # idle priority, so that a step never waits for them (on GPUs the copies' work is the GPU's).
        with new_threads_idle() if backend == "gloo" else contextlib.nullcontext():
            self._switch_group = dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=cfg.timeout_s))
        log.info("joined EP group at %s as rank %d of %d", cfg.init_addr, cfg.rank, cfg.size)

    @property
    def rank(self) -> int:
        return self.cfg.rank

    @property
    def size(self) -> int:
        return self.cfg.size

    def make_placement(self, model: nn.Module) -> ExpertPlacement:
        """The placement for `model`: the one `plan` chose, else from its config (`plan`'s rules)."""
        return self.placement if self.placement is not None else self._placement_for(model.config)

    def plan(self, cfg: ModelConfig) -> ExpertPlacement:
        """Choose the start-up placement from the model's config, before loading: the loader then reads only this
        rank's experts (`local_experts`)."""
        self.placement = self._placement_for(cfg)
        return self.placement

    def local_experts(self, moe_layer: int) -> list[int]:
        """The logical expert of each of this rank's slots in MoE layer `moe_layer`, in slot order (after `plan`)."""
        slots = self.placement.local_slots(self.rank)
        return [int(e) for e in self.placement.phy2log[moe_layer, slots.start:slots.stop]]

    def _placement_for(self, cfg: ModelConfig) -> ExpertPlacement:
        """From the file when one was given, else experts in order plus replicas."""
        num_layers, num_logical = cfg.num_moe_layers, cfg.n_routed_experts
        if self.cfg.placement_file:
            placement = ExpertPlacement.from_file(self.cfg.placement_file, num_logical)
            if placement.ep_size != self.size:
                raise ValueError(f"placement file {self.cfg.placement_file} is for ep_size {placement.ep_size}, "
                                 f"this group has {self.size} ranks")
            if placement.num_layers != num_layers:
                raise ValueError(f"placement file {self.cfg.placement_file} has {placement.num_layers} MoE layers, "
                                 f"the model has {num_layers}")
            return placement
        return ExpertPlacement.default(num_layers, num_logical, self.size, self.cfg.redundant_experts)

    def apply(self, model: nn.Module, role_mode: str = "normal", max_step_tokens: int = 128) -> nn.Module:
        """Make `model` this rank's share of the experts; backends that cannot run fail here, and the grouped GEMM
        compiles its kernels here (`warm_up`), so the caller's barrier after loading finds every rank ready.

        `max_step_tokens`: the most tokens one forward of this rank would carry. DeepEP's low-latency mode takes
        at most `cfg.ll_budget` of them (`low_latency_budget`); `self.max_step_tokens` says what the engine may
        schedule per step.
        """
        self.placement = self.make_placement(model)
        options: dict[str, Any] = {}
        budget = max_step_tokens
        if self.cfg.dispatcher == "deepep":
            mode = role_mode if self.cfg.dispatcher_mode == "auto" else self.cfg.dispatcher_mode
            if mode == "low_latency":
                budget = low_latency_budget(max_step_tokens, self.cfg.ll_budget)
            options["mode"] = mode
            # Buffers are allocated now, so a rank that cannot get them fails at start-up.
            options["hidden"] = model.config.hidden_size
            options["num_max_dispatch_tokens_per_rank"] = budget
        apply_expert_parallel(model, None, self.placement, self.cfg.dispatcher, self.cfg.gemm, options)
        self.max_step_tokens = budget
        from moemesh.ep.experts import EPExperts

        self._experts = [m for m in model.modules() if isinstance(m, EPExperts)]
        self._check_staging_bound()
        self._warm_up(budget * (model.config.num_experts_per_tok or 1))
        return model

    def _check_staging_bound(self) -> None:
        """A switch stages at least one slot's expert at a time: a bound below that fails at start-up."""
        width = max((slot_width(e.slot_tensors()) for e in self._experts), default=0)
        if width > self.cfg.max_staging_mb * (1 << 20):
            raise ValueError(f"--eplb-max-staging-mb {self.cfg.max_staging_mb:g} is below one expert's weights "
                             f"({width / (1 << 20):.2f} MiB): a placement switch could not stage any")

    def _warm_up(self, contiguous_rows: int) -> None:
        """Run each layer's grouped GEMM at the shapes serving will use, where the backend can (DeepGEMM compiles
        on first use, which would hold one rank past DeepEP's timeout in the first step while the others wait).
        Masked layout (DeepEP low latency): C = budget * ep_size rows per slot; else contiguous up to
        `contiguous_rows`, the pairs a rank receives per step when the load is even (tokens * top-k)."""
        for experts in self._experts:
            warm_up = getattr(experts.gemm, "warm_up", None)
            if warm_up is None:
                continue
            # The layer's weights in the GEMM's own form (FP8 and scales for DeepGEMM), as its steps pass them.
            weights, disp = experts._weights, experts.dispatcher
            if getattr(disp, "low_latency", False):
                warm_up(weights, masked_capacity=disp.num_max_dispatch_tokens_per_rank * disp.ep_size)
            else:
                warm_up(weights, contiguous_rows=contiguous_rows)

    # ---- live placement updates --------------------------------------------------------------------------------

    def offer(self, version: int, phy2log: torch.Tensor) -> None:
        """The balancer's placement `version` (phy2log [L, P]); switched to once every rank has it. Engine thread."""
        if self.placement is None or version <= self.placement_version:
            return
        new = ExpertPlacement(phy2log, self.size, self.placement.num_logical)  # validates
        if new.phy2log.shape != self.placement.phy2log.shape:
            raise ValueError(f"placement {version} has shape {tuple(new.phy2log.shape)}, this group serves "
                             f"{tuple(self.placement.phy2log.shape)}")
        self._offers[version] = new.phy2log

    def advance(self, vote: StepVote) -> None:
        """After each vote, at the step boundary: start a switch all ranks agreed on, switch in a round every rank
        has staged (the vote says so), give the copy thread its credit for the coming step, or give up a switch
        that failed on some rank. With no batch anywhere there is nothing to overlap: the next layer is staged and
        switched here, whole."""
        if self._retired:
            self._retired = [(done, old) for done, old in self._retired if not done.query()]
        if self.migration is None:
            if vote.offered <= self.placement_version or vote.offered not in self._offers:
                return
            self._start(vote.offered)
        m = self.migration
        t0 = time.perf_counter()
        try:
            if vote.switch_failed:
                self._give_up()
            elif not vote.any_batch:
                self._switch_layer_now(m)
            else:
                if vote.staged > m.switched:
                    self._switch_next(m)
                if self.migration is not None:
                    m.stager.allow()
        finally:
            held = time.perf_counter() - t0
            self.last_switch_s += held
            self.last_switch_longest_s = max(self.last_switch_longest_s, held)

    def _start(self, version: int) -> None:
        new = ExpertPlacement(self._offers[version], self.size, self.placement.num_logical)
        mib = 1 << 20
        stager = Stager(self._experts, self.placement.phy2log, new, self.rank, self._switch_group,
                        int(self.cfg.max_staging_mb * mib), int(self.cfg.switch_chunk_mb * mib), self.switch_fault)
        self.migration = Migration(version, new, stager, self.placement.phy2log.clone())
        self.last_switch_s, self.last_switch_longest_s, self.last_staging_bytes = 0.0, 0.0, 0

    def _switch_layer_now(self, m: Migration) -> None:
        """Idle group: stage and switch every round of the next layer now (ranks agree through the rounds' own
        agreement: each round's outcome is the same on every rank)."""
        m.stager.run_free(True)
        try:
            layer = m.next_layer
            while self.migration is m and m.next_layer == layer:
                if not m.stager.wait_staged(m.switched + 1):
                    self._give_up()
                    return
                self._switch_next(m)
        finally:
            m.stager.run_free(False)

    def _switch_next(self, m: Migration) -> None:
        """Switch the staged round in: its layer's weights and routing table together, between two forwards."""
        staged, after, done = m.stager.take()
        rnd = staged.round
        experts = self._experts[rnd.layer]
        replaced: list[list[Any]] = []  # held only here, so that handing it over leaves the copy thread the last
        if staged.layer is not None:   # reference (the step thread frees no layer)
            replaced.append(experts.swap_layer(after, staged.layer, staged.form))
            m.swapped += 1
            if staged.layer[0].is_cuda:  # forwards queued before the swap may still read the old layer
                passed = torch.cuda.Event()
                passed.record(torch.cuda.current_stream(staged.layer[0].device))
                self._retired.append((passed, replaced.pop()))
        else:
            experts.switch_slots(after, staged.slots, staged.rows)
        m.stager.switched(replaced.pop() if replaced else None)  # the copy thread stages into it, or frees it
        m.rows[rnd.layer] = after.phy2log[rnd.layer]
        m.switched += 1
        m.moved_slots += len(rnd.moves)
        per_rank = self.placement.slots_per_rank
        m.received += sum(1 for mv in rnd.moves if mv.slot // per_rank == self.rank != mv.source // per_rank)
        if rnd.last_of_layer:
            m.next_layer = rnd.layer + 1
        if done:
            self._finish(m)

    def _finish(self, m: Migration) -> None:
        # Not joined: the copy thread frees the last layer it replaced before it ends, at its idle priority.
        self._record(m)
        self.placement, self.placement_version, self.migration = m.placement, m.version, None
        self._offers = {v: p for v, p in self._offers.items() if v > m.version}
        log.info("EP rank %d now serves placement %d (%d expert weights received, %d rounds, staging peak %.1f MiB "
                 "of %.0f MiB allowed%s, %.1f ms at step boundaries)", self.rank, m.version, m.received, m.switched,
                 m.stager.peak_bytes / (1 << 20), self.cfg.max_staging_mb,
                 f", {m.stager.over_bound_rounds} round(s) over it" if m.stager.over_bound_rounds else "",
                 1e3 * self.last_switch_s)

    def _give_up(self) -> None:
        """A round failed on some rank: every rank stops the switch at this same boundary. Rounds already switched
        stay (each layer serves a whole placement row, never a half-switched one); the rest keep their weights."""
        m = self.migration
        m.stager.cancel()
        self._record(m)
        if not torch.equal(m.rows, self.placement.phy2log):
            self.placement = ExpertPlacement(m.rows.clone(), self.size, self.placement.num_logical)
        self.migration = None
        self._offers = {v: p for v, p in self._offers.items() if v > m.version}
        log.warning("EP rank %d gave up the switch to placement %d after %d rounds (%d of %d MoE layers whole); "
                    "serving on with the placement as it stands", self.rank, m.version, m.switched, m.next_layer,
                    len(self._experts))

    def _record(self, m: Migration) -> None:
        self.last_staging_bytes = m.stager.peak_bytes
        self.last_switch_rounds, self.last_switch_received, self.last_switch_swapped = m.switched, m.received, m.swapped

    @property
    def switching(self) -> bool:
        return self.migration is not None

    # ---- the step -----------------------------------------------------------------------------------------------

    def vote(self, has_batch: bool, can_split: bool, stopping: bool) -> StepVote:
        """The step's collective decision: one all-reduce MAX of [has_batch, cannot split, not stopping,
        newest offered placement, minus the newest offered placement, minus the switch's rounds staged, the
        switch failed] (the newest and the oldest of the ranks' newest offers: a switch starts only when all
        ranks hold the same one; a staged round is switched in only when every rank has it)."""
        v = self._vote
        newest = max(self._offers, default=self.placement_version)
        m = self.migration
        staged, failed = (m.stager.staged, m.stager.failed) if m is not None else (0, False)
        v[0], v[1], v[2], v[3], v[4] = int(has_batch), int(not can_split), int(not stopping), newest, -newest
        v[5], v[6] = -staged, int(failed)  # minus: MAX gives the fewest rounds any rank has staged
        self.collective(dist.all_reduce, v, op=dist.ReduceOp.MAX)
        any_batch, all_can_split = bool(v[0]), not v[1]
        offered = int(v[3]) if int(v[3]) == -int(v[4]) else 0
        return StepVote(any_batch=any_batch, all_can_split=all_can_split,
                        split=self.cfg.enable_tbo and any_batch and all_can_split, all_stopping=not v[2],
                        offered=offered, staged=-int(v[5]), switch_failed=bool(v[6]))

    def barrier(self) -> None:
        self.collective(dist.barrier)

    def collective(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:
            raise GroupFailed(describe_failure(self.rank, self.size, e)) from e

    def close(self) -> None:
        """Leave a healthy group together: meet in a barrier first, since a rank tearing down its connections
        while a peer's gloo threads still used them was seen to end the peer with std::terminate (2 runs in
        about 70 of tests/processes/ep/test_ep_migrate.py). A peer already gone fails the barrier at once.
        After the barrier the dispatcher frees its buffers (DeepEP's meet the peers once more); after a failed
        one they are left alone, as a barrier of theirs would wait on the dead peer."""
        if not dist.is_initialized():
            return
        if self.migration is not None:  # every rank leaves at the same boundary: the copy threads stop alike
            self.migration.stager.cancel()
        try:
            dist.barrier()
        except RuntimeError as e:
            log.debug("EP rank %d: barrier before leaving failed: %s", self.rank, e)
        else:
            self._close_dispatchers()
        dist.destroy_process_group()

    def _close_dispatchers(self) -> None:
        """Each dispatcher once (all layers share one), in the same order on every rank."""
        seen: set[int] = set()
        for experts in self._experts:
            if id(experts.dispatcher) not in seen:
                seen.add(id(experts.dispatcher))
                experts.dispatcher.close()


def low_latency_budget(asked: int, cap: int) -> int:
    """DeepEP low latency's per-rank budget: the tokens asked for, rounded up to a multiple of 4 (DeepEP needs
    ep_size * budget % 4 == 0, and rounding up never drops a token), at most `cap` (its RDMA buffer, NVSHMEM queue
    depth and per-step latency grow with the budget; the dispatcher checks the cap against DeepEP's limits)."""
    return min(-(-asked // 4) * 4, cap)


def describe_failure(rank: int, size: int, error: BaseException) -> str:
    """One line for users: which group member saw what (gloo's messages run over several lines)."""
    if isinstance(error, GroupFailed):  # described already, where the collective failed
        return str(error)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"the EP group failed (seen by rank {rank} of {size}): a peer rank died, hung or left ({first[:300]})"
