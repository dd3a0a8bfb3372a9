"""Continuous batching over paged KV: which requests run this step, and with how many tokens.

Pure Python, no tensors. Policy (SGLang's, prefill first):
- A step is a prefill step when any admitted request still has prompt tokens to compute, or a waiting
  request can be admitted; its tokens fit a budget (`max_num_batched_tokens`), so long prompts are
  chunked over several steps. New prompts join a step while their uncached tokens fit a second, smaller
  bound where one is set (`max_prefill_tokens`, SGLang's `--max-prefill-tokens`; a step always takes at least
  one): short prompts arriving together then leave in several short steps, the first ones' first tokens
  earlier. Otherwise it is a decode step: every running request feeds one token.
- Admission reserves pages for a request's whole prompt, after reusing its longest cached prefix;
  it stops at the first request that does not fit (first come, first served).
- A decode step that needs a page when none is free preempts the most recently admitted request:
  its pages are released (into the prefix cache) and it goes back to the front of the queue, to be
  recomputed from its prompt and the tokens generated so far.
- The queue is bounded (`max_waiting_requests`; None, for in-process use, leaves it unbounded): past
  it, `add` and `reserve` raise `QueueFull` at once rather than let requests (and memory) pile up. A
  prompt that needs more pages than the whole cache has is refused at once (`KvCacheTooSmall`): it
  could only wait for ever. Preempted requests go back whatever the queue's length: they were admitted.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from moemesh.engine.errors import QUEUE_FULL_RETRY_AFTER_S, KvCacheTooSmall, QueueFull, RequestTooLong
from moemesh.engine.page_pool import PagePool
from moemesh.engine.radix_cache import RadixCache
from moemesh.engine.request import FinishReason, Request, RequestStatus

# The errors `add` raises live in moemesh.engine.errors (torch-free); they are importable from here too.
__all__ = ["KvCacheTooSmall", "QueueFull", "RequestTooLong", "ScheduledBatch", "ScheduledSeq", "Scheduler",
           "SchedulerConfig"]


@dataclass(frozen=True)
class SchedulerConfig:
    num_pages: int
    page_size: int
    max_model_len: int
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # Uncached tokens of new prompts in one prefill step at most, past the first prompt; None: the step budget.
    max_prefill_tokens: int | None = None
    enable_prefix_caching: bool = True
    # Requests queued for admission (waiting, or reserving on a PD decode worker) at most; None: no bound.
    max_waiting_requests: int | None = None
    # Pages kept free at admission while others run, so that running requests can grow a while
    # before anything has to be preempted.
    watermark: float = 0.01

    def __post_init__(self) -> None:
        for name in ("num_pages", "page_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prefill_tokens is not None and self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1 (None: the step budget), got {self.max_prefill_tokens}")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1 (None: unbounded), got {self.max_waiting_requests}")
        if self.num_pages * self.page_size < self.max_model_len:
            raise ValueError(
                f"the KV cache ({self.num_pages} pages x {self.page_size} tokens) cannot hold one sequence "
                f"of max_model_len {self.max_model_len} tokens")


@dataclass
class ScheduledSeq:
    """One request's share of a step: tokens `all_token_ids[start : start + num_new_tokens]`."""

    request: Request
    start: int
    num_new_tokens: int
    sample: bool  # the chunk reaches the end of the request's tokens: sample the next one


@dataclass
class ScheduledBatch:
    seqs: list[ScheduledSeq]
    is_prefill: bool
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig) -> None:
        self.cfg = cfg
        self.pool = PagePool(cfg.num_pages)
        self.cache = RadixCache(self.pool, cfg.page_size, enabled=cfg.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.running: list[Request] = []
        # Disaggregation: decode-side requests waiting for pages to receive KV into, and those receiving;
        # prefill-side requests whose first token is out and whose pages wait for the sender.
        self.reserving: deque[Request] = deque()
        self.transferring: list[Request] = []
        self.held: list[Request] = []
        self.newly_reserved: list[Request] = []
        self._watermark_pages = math.ceil(cfg.watermark * cfg.num_pages)
        self.num_preemptions = 0

    # ---- queue state ---------------------------------------------------------------------------
    @property
    def num_unfinished(self) -> int:
        return (len(self.waiting) + len(self.prefilling) + len(self.running) + len(self.reserving)
                + len(self.transferring) + len(self.held))

    @property
    def has_work(self) -> bool:
        """Whether a step could make progress (transferring and held requests only wait)."""
        return bool(self.waiting or self.prefilling or self.running or self.reserving)

    @property
    def num_free_pages(self) -> int:
        """Pages that a new request could get: free ones plus cached ones nobody uses."""
        return self.pool.num_free + self.cache.num_evictable

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.cfg.page_size)

    @property
    def num_queued(self) -> int:
        """Requests waiting for admission (pages, a batch slot): what `max_waiting_requests` bounds."""
        return len(self.waiting) + len(self.reserving)

    def add(self, req: Request) -> None:
        """Queue a request; raises (queueing nothing) as `check_admissible` says."""
        self.check_admissible(req)
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def reserve(self, req: Request) -> None:
        """Decode side of PD: queue a request that will receive its prompt's KV instead of computing it."""
        self.check_admissible(req)
        req.status = RequestStatus.RESERVING
        self.reserving.append(req)

    def check_admissible(self, req: Request) -> None:
        """Refuse now what could only fail or wait for ever: RequestTooLong when the tokens leave no room
        for a generated one in the context; KvCacheTooSmall when they and that token need more pages than
        the whole cache has; QueueFull when `max_waiting_requests` already wait."""
        n = req.num_tokens  # a migrated request brings the outputs it already produced
        if n == 0:
            raise RequestTooLong("the prompt is empty")
        # The cache first: where it caps the context, "more KV than this worker has" is the real cause.
        need, total = self.pages_for(n + 1), self.cfg.num_pages
        if need > total:
            raise KvCacheTooSmall(
                f"the prompt has {n} tokens; with one generated token they need {need} KV pages of "
                f"{self.cfg.page_size} tokens, more than this worker's whole KV cache ({total} pages)")
        if n >= self.cfg.max_model_len:
            raise RequestTooLong(
                f"the prompt has {n} tokens; the context limit is {self.cfg.max_model_len} tokens, "
                f"prompt and output together")
        bound = self.cfg.max_waiting_requests
        if bound is not None and self.num_queued >= bound:
            raise QueueFull(
                f"this worker's queue is full: {self.num_queued} requests already wait for KV pages or a "
                f"batch slot (max_waiting_requests={bound}; {len(self.running)} running); retry in about "
                f"{QUEUE_FULL_RETRY_AFTER_S:g} s")

    def commit_transfer(self, req: Request) -> None:
        """The prompt's KV arrived in the reserved pages: the request joins the running batch."""
        if req.status is not RequestStatus.TRANSFERRING:
            raise ValueError(f"request {req.request_id} is {req.status.value}, not transferring")
        self.transferring.remove(req)
        req.num_computed = req.num_tokens
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        self._cache_prefix(req)

    def hold(self, req: Request) -> None:
        """Prefill side of PD: the first token is out; keep the pages until the KV has been sent."""
        self.running.remove(req)
        req.status = RequestStatus.HELD
        self.held.append(req)

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        """Choose the next step's work; None when there is nothing to do."""
        self._admit_reservations()
        batch = self._schedule_prefill()
        if batch.seqs:
            return batch
        batch = self._schedule_decode()
        return batch if batch.seqs else None

    def _schedule_prefill(self) -> ScheduledBatch:
        budget = self.cfg.max_num_batched_tokens
        seqs: list[ScheduledSeq] = []
        for req in self.prefilling:
            if budget <= 0:
                break
            n = min(req.num_tokens - req.num_computed, budget)
            seqs.append(ScheduledSeq(req, req.num_computed, n, req.num_computed + n == req.num_tokens))
            budget -= n
        new_tokens, bound = 0, self.cfg.max_prefill_tokens
        while self.waiting and budget > 0 and len(self.prefilling) + len(self.running) < self.cfg.max_num_seqs:
            req = self.waiting[0]
            if bound is not None and seqs:
                need = min(req.num_tokens - self.cache.prefix_tokens(self._prefix_query(req)), budget)
                if new_tokens + need > bound:
                    break
            if not self._admit(req):
                break
            self.waiting.popleft()
            n = min(req.num_tokens - req.num_computed, budget)
            seqs.append(ScheduledSeq(req, req.num_computed, n, req.num_computed + n == req.num_tokens))
            budget -= n
            new_tokens += n
        return ScheduledBatch(seqs, is_prefill=True)

    def _admit_reservations(self) -> None:
        """Give reserving requests their pages, first come first served; `newly_reserved` lists them."""
        while self.reserving:
            req = self.reserving[0]
            need = self.pages_for(req.num_tokens)
            reserve = self._watermark_pages if (self.running or self.prefilling) else 0
            if need + reserve > self.num_free_pages:
                return
            self.reserving.popleft()
            req.pages = self._alloc(need)
            req.status = RequestStatus.TRANSFERRING
            self.transferring.append(req)
            self.newly_reserved.append(req)

    @staticmethod
    def _prefix_query(req: Request) -> list[int]:
        """The tokens whose cached prefix a request may reuse. Keep at least the last token out of the match: its
        logits must be computed to sample. Prompt logprobs need every prompt position's logits: nothing cached is
        reused."""
        return [] if req.params.prompt_logprobs is not None else req.all_token_ids[:-1]

    def _admit(self, req: Request) -> bool:
        tokens = req.all_token_ids
        match = self.cache.match_prefix(self._prefix_query(req))
        self.cache.lock(match.node)  # pin before counting what is free: pinned pages are not
        need = self.pages_for(len(tokens)) - len(match.pages)
        reserve = self._watermark_pages if (self.running or self.prefilling) else 0
        if need + reserve > self.num_free_pages:
            self.cache.unlock(match.node)
            return False
        req.pages = match.pages + self._alloc(need)
        req.prefix_node = match.node
        req.num_computed = req.num_cached_tokens = match.num_tokens
        req.status = RequestStatus.PREFILLING
        self.prefilling.append(req)
        return True

    def _schedule_decode(self) -> ScheduledBatch:
        seqs: list[ScheduledSeq] = []
        preempted: list[Request] = []
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            while req.num_computed // self.cfg.page_size >= len(req.pages):
                if self.num_free_pages > 0:
                    req.pages += self._alloc(1)
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            if req.status is RequestStatus.RUNNING:
                seqs.append(ScheduledSeq(req, req.num_computed, 1, True))
        return ScheduledBatch(seqs, is_prefill=False, preempted=preempted)

    def on_step_done(self, batch: ScheduledBatch) -> None:
        """The step's KV is computed: advance requests; a finished prompt starts decoding."""
        for s in batch.seqs:
            req = s.request
            req.num_computed = s.start + s.num_new_tokens
            if req.status is RequestStatus.PREFILLING and req.num_computed == req.num_tokens:
                self.prefilling.remove(req)
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                self._cache_prefix(req)

    # ---- ending and evicting requests ----------------------------------------------------------
    def finish(self, req: Request, reason: FinishReason) -> None:
        """Mark a request done and give its pages back (full computed pages stay in the prefix cache)."""
        if req.status is RequestStatus.FINISHED:
            return
        queue = {
            RequestStatus.WAITING: self.waiting, RequestStatus.PREFILLING: self.prefilling,
            RequestStatus.RUNNING: self.running, RequestStatus.RESERVING: self.reserving,
            RequestStatus.TRANSFERRING: self.transferring, RequestStatus.HELD: self.held,
        }[req.status]
        queue.remove(req)
        if req in self.newly_reserved:
            self.newly_reserved.remove(req)
        self._release(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.status = RequestStatus.WAITING
        req.num_computed = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _alloc(self, n: int) -> list[int]:
        short = n - self.pool.num_free
        if short > 0:
            self.cache.evict(short)
        return self.pool.alloc(n)

    def _cache_prefix(self, req: Request) -> None:
        """Share the request's computed full pages with later requests while it keeps running."""
        n_full = req.num_computed // self.cfg.page_size
        if not self.cache.enabled or n_full == 0:
            return
        tree_pages, node = self.cache.insert(req.all_token_ids[: n_full * self.cfg.page_size], req.pages[:n_full])
        dup = [p for p, t in zip(req.pages[:n_full], tree_pages, strict=True) if p != t]
        if dup:
            # Another request cached the same tokens first: use its pages (same KV), free ours.
            self.pool.free(dup)
            req.pages[:n_full] = tree_pages
        self.cache.lock(node)
        if req.prefix_node is not None:
            self.cache.unlock(req.prefix_node)
        req.prefix_node = node

    def _release(self, req: Request) -> None:
        n_full = req.num_computed // self.cfg.page_size
        private = req.pages
        if self.cache.enabled and n_full:
            tree_pages, _ = self.cache.insert(req.all_token_ids[: n_full * self.cfg.page_size], req.pages[:n_full])
            private = [p for p, t in zip(req.pages[:n_full], tree_pages, strict=True) if p != t] + req.pages[n_full:]
        self.pool.free(private)
        if req.prefix_node is not None:
            self.cache.unlock(req.prefix_node)
        req.pages = []
        req.prefix_node = None
