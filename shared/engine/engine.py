"""The in-process engine: `schedule -> run -> postprocess`, one step at a time.

This is what a prefill or decode service wraps, and the reference the mesh's outputs are checked
against. It is single-threaded: callers own the loop (`step`) or use `generate` for a batch.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moemesh.device import bind_thread
from moemesh.engine.grammar import GrammarEngine
from moemesh.engine.kv_cache import LatentKVCache
from moemesh.engine.request import FinishReason, Request, RequestOutput, RequestStatus
from moemesh.engine.runner import ModelRunner
from moemesh.engine.sampling import Sampler
from moemesh.engine.sampling_params import InvalidParameter, SamplingParams
from moemesh.engine.scheduler import RequestTooLong, ScheduledBatch, Scheduler, SchedulerConfig
from moemesh.engine.stop import check_stop, streamable_len
from moemesh.kernels.backends import decode_attention, install_kernels
from moemesh.model.config import ModelConfig
from moemesh.model.deepseek import DeepseekForCausalLM
from moemesh.model.default import default_model_dir
from moemesh.model.detokenizer import IncrementalDetokenizer
from moemesh.model.loader import load_model
from moemesh.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    from moemesh.ep.group import EPGroup

__all__ = ["Completion", "Engine", "EngineConfig", "InvalidParameter", "RequestTooLong", "Resume"]


@dataclass(frozen=True)
class EngineConfig:
    """How one engine instance is sized. `model=None` is the embedded tiny model."""

    model: str | None = None
    dtype: str = "auto"
    page_size: int = 16
    num_pages: int | None = None         # None: as many as `kv_cache_mb` holds
    kv_cache_mb: int = 512
    max_model_len: int | None = None     # None: the model's context, capped by the cache
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048   # chunked prefill: prompt tokens per step
    max_prefill_tokens: int | None = None  # new prompts' tokens per prefill step past the first; None: the above
    enable_prefix_caching: bool = True
    max_waiting_requests: int | None = None  # queued requests at most (None: unbounded); past it QueueFull
    seed: int = 0                        # the shared generator of unseeded random sampling
    num_threads: int | None = None       # torch intra-op threads; None leaves torch's default
    record_expert_load: bool = True      # count routed tokens per (MoE layer, expert) for metrics
    device: str = "cpu"                  # where weights and the KV cache live ("cuda:N" on a GPU)
    kernels: str = "auto"                # compute kernels (moemesh.kernels): auto picks by device and dtype

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if self.kv_cache_mb < 1:
            raise ValueError(f"kv_cache_mb must be >= 1, got {self.kv_cache_mb}")


@dataclass(frozen=True)
class Resume:
    """A migrated request's outputs so far: their token ids, and how many characters of their text the
    client already has."""

    token_ids: Sequence[int] = ()
    text_chars: int = 0


@dataclass
class Completion:
    """A finished request, as `Engine.generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    extra: dict = field(default_factory=dict)


class Engine:
    def __init__(self, cfg: EngineConfig | None = None, model: DeepseekForCausalLM | None = None,
                 tokenizer: Tokenizer | None = None, ep: EPGroup | None = None, role_mode: str = "normal") -> None:
        """`ep`: this process's rank of an EP group; the model keeps only the rank's experts, and every
        `execute` (even without a batch) joins the group's collectives. `role_mode` picks the dispatcher's
        mode where it has several ("normal" for prefill, "low_latency" for decode)."""
        cfg = cfg or EngineConfig()
        self.cfg = cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        bind_thread(cfg.device)  # loading allocates on the device: this thread's current one must be it
        model_dir = Path(cfg.model) if cfg.model else default_model_dir()
        self.model_dir = model_dir
        if model is None:
            experts = None
            if ep is not None:  # an EP rank reads only its own experts from the checkpoint
                ep.plan(ModelConfig.from_dir(model_dir))
                experts = ep.local_experts
            model = load_model(model_dir, cfg.dtype, cfg.device, experts)
        self.model = model
        self.ep = ep
        max_step_tokens, max_seqs = cfg.max_num_batched_tokens, cfg.max_num_seqs
        if ep is not None:
            ep.apply(self.model, role_mode, max(max_step_tokens, max_seqs))
            # A dispatcher may carry fewer tokens per forward than asked (DeepEP's low-latency budget): no step
            # may schedule more.
            max_step_tokens, max_seqs = min(max_step_tokens, ep.max_step_tokens), min(max_seqs, ep.max_step_tokens)
        self.kernels = install_kernels(self.model, cfg.kernels)
        self.tokenizer = tokenizer if tokenizer is not None else _maybe_tokenizer(model_dir)
        mc = self.model.config
        dtype = next(self.model.parameters()).dtype
        num_pages = cfg.num_pages or max(
            1, cfg.kv_cache_mb * 2**20 // LatentKVCache.bytes_per_page(mc, cfg.page_size, dtype))
        capacity = num_pages * cfg.page_size
        max_len = cfg.max_model_len or mc.max_position_embeddings
        if cfg.max_model_len and cfg.max_model_len > capacity:
            raise ValueError(f"max_model_len {cfg.max_model_len} exceeds the KV cache's {capacity} tokens; "
                             f"give the cache more memory")
        self.max_model_len = min(max_len, capacity)
        self.scheduler = Scheduler(SchedulerConfig(
            num_pages=num_pages, page_size=cfg.page_size, max_model_len=self.max_model_len,
            max_num_seqs=max_seqs, max_num_batched_tokens=max_step_tokens, max_prefill_tokens=cfg.max_prefill_tokens,
            enable_prefix_caching=cfg.enable_prefix_caching, max_waiting_requests=cfg.max_waiting_requests))
        eos = set(mc.eos_token_ids)
        if self.tokenizer is not None:
            eos.update(self.tokenizer.eos_token_ids)
        self.eos_token_ids = tuple(sorted(eos))
        self.cache = LatentKVCache(mc, num_pages, cfg.page_size, dtype, next(self.model.parameters()).device)
        self.grammars = GrammarEngine(self.tokenizer, mc.vocab_size, self.eos_token_ids)
        self.runner = ModelRunner(self.model, self.cache, Sampler(Sampler.make_generator(cfg.seed)),
                                  self.eos_token_ids, decode_attention(self.kernels))
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.expert_load = None
        if cfg.record_expert_load and mc.n_routed_experts:
            from moemesh.telemetry.expert_load import ExpertLoadRecorder

            self.expert_load = ExpertLoadRecorder(self.model)

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None, prefill_only: bool = False, resume: Resume | None = None
                    ) -> str:
        """Queue a prompt (text, or token ids); returns its id. Raises on an invalid or too long prompt.

        `prefill_only` (PD prefill): the request ends after its first token, keeping its pages until
        `release` so that its KV can be sent; `read_kv` reads the rows.
        `resume`: a migrated request continues after the outputs its previous worker produced.
        """
        req = self._new_request(prompt, params, request_id, resume)
        req.prefill_only = prefill_only
        self.scheduler.add(req)
        self.requests[req.request_id] = req
        return req.request_id

    def reserve_request(self, prompt: Sequence[int], params: SamplingParams | None = None,
                        request_id: str | None = None, resume: Resume | None = None) -> str:
        """PD decode: queue a request whose prompt KV will arrive from a prefill worker.

        A later `step` gives it pages (it then appears in `take_reserved`); `write_kv` fills them and
        `commit_transfer` starts decoding with the prefill's first token.
        """
        req = self._new_request(prompt, params, request_id, resume)
        req.prompt_logprobs = None  # the prefill worker computes the prompt, and its logprobs
        self.scheduler.reserve(req)
        self.requests[req.request_id] = req
        return req.request_id

    def _new_request(self, prompt: str | Sequence[int], params: SamplingParams | None,
                     request_id: str | None, resume: Resume | None = None) -> Request:
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidParameter("prompt: this model has no tokenizer; send token ids")
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            prompt_ids = [int(t) for t in prompt]
            vocab = self.model.config.vocab_size
            bad = [t for t in prompt_ids if not 0 <= t < vocab]
            if bad:
                raise InvalidParameter(f"prompt: token ids must be in [0, {vocab}), got {bad[:5]}")
        if params.logit_bias and params.logit_bias[-1][0] >= self.model.config.vocab_size:
            raise InvalidParameter(f"logit_bias: token id {params.logit_bias[-1][0]} is outside the vocabulary "
                                   f"(size {self.model.config.vocab_size})")
        if params.stop and self.tokenizer is None:
            raise InvalidParameter("stop: stop strings need a tokenizer; use stop_token_ids")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise InvalidParameter(f"request_id {rid!r} is already in use")
        req = Request(rid, prompt_ids, params, arrival=next(self._ids))
        if params.seed is not None:
            req.generator = Sampler.make_generator(params.seed)
        if self.tokenizer is not None:
            req.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
        if params.structured_output is not None:
            req.grammar = self.grammars.state(params.structured_output)
        if params.prompt_logprobs is not None and not (resume is not None and resume.token_ids):
            req.prompt_logprobs = [None] * len(prompt_ids)
        if resume is not None and resume.token_ids:
            self._resume(req, resume)
        return req

    def _resume(self, req: Request, resume: Resume) -> None:
        """Make `req` continue after outputs another worker produced: the same state as if it had."""
        tokens = [int(t) for t in resume.token_ids]
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in tokens):
            raise InvalidParameter(f"resume_token_ids: token ids must be in [0, {vocab})")
        if len(tokens) >= req.params.max_tokens:
            raise InvalidParameter(f"resume_token_ids: {len(tokens)} tokens already reach max_tokens "
                                   f"{req.params.max_tokens}")
        if req.grammar is not None and not all(req.grammar.accept(t) for t in tokens):
            raise InvalidParameter("resume_token_ids: the outputs do not follow the request's structured_output")
        req.output_token_ids = tokens
        if req.detokenizer is not None:
            for t in tokens:
                req.output_text += req.detokenizer.add(t)
            # The client has this much; text held back for a possible stop string is sent again.
            req.num_sent_chars = min(resume.text_chars, len(req.output_text))
        if req.generator is not None and not req.params.greedy:
            for _ in tokens:  # each earlier output drew once from the request's seeded generator
                self.runner.sampler.advance(req.generator, self.model.config.vocab_size)

    # ---- disaggregation: moving a prompt's KV between engines ---------------------------------
    @property
    def kv_row_width(self) -> int:
        return self.model.config.kv_cache_dim

    def read_kv(self, request_id: str, start: int, end: int) -> torch.Tensor:
        """A copy of the request's KV rows for tokens [start, end): [L, end - start, W] in the cache dtype."""
        req = self.requests[request_id]
        if not 0 <= start <= end <= req.num_computed:
            raise ValueError(f"rows [{start}, {end}) of {request_id} are not computed ({req.num_computed} are)")
        return self.cache.data.index_select(1, self.cache.slots(req.pages, start, end))

    def write_kv(self, request_id: str, start: int, rows: torch.Tensor) -> None:
        """Store received rows [L, N, W] for tokens [start, start + N) into a transferring request's pages.

        Safe to call from another thread while the engine steps: the pages are reserved for this
        request alone and no step reads them until `commit_transfer`.
        """
        req = self.requests[request_id]
        n = rows.shape[1]
        if req.status is not RequestStatus.TRANSFERRING:
            raise ValueError(f"request {request_id} is {req.status.value}, not receiving KV")
        if rows.shape[0] != self.cache.data.shape[0] or rows.shape[2] != self.kv_row_width:
            raise ValueError(f"rows of shape {tuple(rows.shape)} do not fit this cache's "
                             f"[{self.cache.data.shape[0]}, N, {self.kv_row_width}] layout")
        if not (0 <= start and start + n <= req.num_tokens):
            raise ValueError(f"rows [{start}, {start + n}) fall outside the tokens of {request_id}")
        # Rows come off the network on the CPU; the cache may live on a GPU.
        data = self.cache.data
        data[:, self.cache.slots(req.pages, start, start + n)] = rows.to(data.device, data.dtype)

    def take_reserved(self) -> list[str]:
        """Requests that got their pages since the last call (ready for `write_kv`)."""
        out = [r.request_id for r in self.scheduler.newly_reserved]
        self.scheduler.newly_reserved.clear()
        return out

    def commit_transfer(self, request_id: str, token: int, logprob: float | None = None,
                        top: list[tuple[int, float]] | None = None) -> RequestOutput:
        """The prompt's KV is in place: the prefill's first token becomes this request's first output."""
        req = self.requests[request_id]
        self.scheduler.commit_transfer(req)
        req.timing.committed_ns = time.monotonic_ns()
        if req.generator is not None and not req.params.greedy:
            # The prefill worker drew this token from the same seed: skip that draw to stay in step.
            self.runner.sampler.advance(req.generator, self.model.config.vocab_size)
        return self._postprocess(req, token, logprob, top, req.timing.committed_ns)

    def release(self, request_id: str) -> bool:
        """PD prefill: the KV was sent (or the send failed); give the held pages back."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req, FinishReason.STOP)
        req.timing.finished_ns = time.monotonic_ns()
        return True

    def abort(self, request_id: str) -> bool:
        """Cancel a request wherever it is; its pages are freed. False if it was unknown or done."""
        req = self.requests.pop(request_id, None)
        if req is None or req.finished:
            return False
        self.scheduler.finish(req, FinishReason.ABORT)
        req.timing.finished_ns = time.monotonic_ns()
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ---- the loop ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduler step: outputs of every request that produced a token (or ended) in it."""
        return self.execute(self.schedule())

    def schedule(self) -> ScheduledBatch | None:
        """The first half of `step`: the batch to run next, or None."""
        batch = self.scheduler.schedule()
        now = time.monotonic_ns()  # timestamps: one clock read per step, none per token
        for req in self.scheduler.newly_reserved:
            if not req.timing.reserved_ns:
                req.timing.reserved_ns = now
        if batch is not None:
            for s in batch.seqs:
                if not s.request.timing.scheduled_ns:
                    s.request.timing.scheduled_ns = now
        return batch

    def can_split(self, batch: ScheduledBatch | None) -> bool:
        """Whether this batch can run as two micro-batches (an empty one can: two empty halves)."""
        return batch is None or len(batch.seqs) >= 2

    def execute(self, batch: ScheduledBatch | None, split: bool = False) -> list[RequestOutput]:
        """The second half of `step`: run `batch` (as two micro-batches if `split`) and post-process.

        In an EP group a rank without a batch still runs the forward, empty, for its peers' collectives.
        """
        if batch is None:
            if self.ep is not None:
                self.runner.run_empty(split)
            return []
        result = self.runner.run(batch, split)
        self.scheduler.on_step_done(batch)
        now = time.monotonic_ns()
        outputs = []
        sampled = [s.request for s in batch.seqs if s.sample]
        for i, req in enumerate(sampled):
            if req.prefill_only:
                outputs.append(self._prefill_done(req, result.token_ids[i], result.logprobs[i],
                                                  result.top_logprobs[i], now))
            else:
                outputs.append(self._postprocess(req, result.token_ids[i], result.logprobs[i],
                                                 result.top_logprobs[i], now))
        return outputs

    def _prefill_done(self, req: Request, token: int, logprob: float | None,
                      top: list[tuple[int, float]] | None, now_ns: int) -> RequestOutput:
        """PD prefill: report the first token and hold the pages; stop rules are the decode side's."""
        self.scheduler.hold(req)
        if not req.timing.first_token_ns:
            req.timing.first_token_ns = now_ns
        return RequestOutput(
            request_id=req.request_id, new_token_ids=[token], new_text="",
            new_logprobs=[logprob] if logprob is not None else [],
            new_top_logprobs=[top] if top is not None else [], finished=False,
            num_prompt_tokens=len(req.prompt_token_ids), num_output_tokens=0,
            num_cached_tokens=req.num_cached_tokens, prefill_done=True, time_ns=now_ns, timing=req.timing,
            prompt_logprobs=req.prompt_logprobs, first_text=self._early_text(req, token))

    @staticmethod
    def _early_text(req: Request, token: int) -> str | None:
        """PD prefill: the text of the first token that the decode worker's first output will begin with, so that
        the client can have it before the KV handoff; None where that is not sure.

        The decode worker runs the same detokenizer over the same prompt, so its first text is this piece, plus
        the detokenizer's flushed tail if the token ends the request (an EOS, a stop token, max_tokens, a grammar's
        end): this is a prefix of it in every case but two, left out: a stop string (the decode side may cut or
        hold back text) and a resumed request (the client's text there is counted by characters already sent).
        Prompt logprobs go out with the first response, which must then wait for the prefill's reply: left out.
        """
        p = req.params
        if req.detokenizer is None or req.output_token_ids or p.stop or p.prompt_logprobs is not None:
            return None
        return req.detokenizer.add(token)  # this side's detokenizer: the request ends here, nothing else reads it

    def _postprocess(self, req: Request, token: int, logprob: float | None,
                     top: list[tuple[int, float]] | None, now_ns: int) -> RequestOutput:
        if not req.timing.first_token_ns:
            req.timing.first_token_ns = now_ns
        req.output_token_ids.append(token)
        if logprob is not None:
            req.output_logprobs.append(logprob)
        if top is not None:
            req.output_top_logprobs.append(top)
        if req.detokenizer is not None:
            req.output_text += req.detokenizer.add(token)
        reason, stop_reason = check_stop(req, token, self.eos_token_ids, self.max_model_len)
        if req.grammar is not None and reason is None and _grammar_ended(req.grammar, token):
            reason, stop_reason = FinishReason.STOP, token
        if reason is not None:
            if req.detokenizer is not None and not isinstance(stop_reason, str):
                req.output_text += req.detokenizer.flush()  # an incomplete last character, as is
            req.stop_reason = stop_reason
            self.scheduler.finish(req, reason)
            req.timing.finished_ns = now_ns
            self.requests.pop(req.request_id, None)
            end = len(req.output_text)
        else:
            end = streamable_len(req.output_text, req.params.stop)
        # Text once sent is never taken back: a tail that might start a stop string waits until settled.
        delta = req.output_text[req.num_sent_chars:end] if end > req.num_sent_chars else ""
        req.num_sent_chars = max(req.num_sent_chars, end)
        return RequestOutput(
            request_id=req.request_id, new_token_ids=[token], new_text=delta,
            new_logprobs=[logprob] if logprob is not None else [],
            new_top_logprobs=[top] if top is not None else [],
            finished=reason is not None, finish_reason=reason, stop_reason=stop_reason,
            num_prompt_tokens=len(req.prompt_token_ids), num_output_tokens=req.num_output_tokens,
            num_cached_tokens=req.num_cached_tokens, time_ns=now_ns, timing=req.timing,
            prompt_logprobs=req.prompt_logprobs if len(req.output_token_ids) == 1 else None)

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Run prompts to completion together (continuous batching) and return them in order."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        reqs = []
        for prompt, p in zip(prompts, plist, strict=True):
            rid = self.add_request(prompt, p)
            reqs.append(self.requests[rid])
        while any(not r.finished for r in reqs):
            self.step()
        return [_completion(r) for r in reqs]

    # ---- introspection -------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        s = self.scheduler
        return {
            "num_waiting": len(s.waiting), "num_prefilling": len(s.prefilling), "num_running": len(s.running),
            "num_pages": s.cfg.num_pages, "num_free_pages": s.num_free_pages, "num_cached_pages": s.cache.num_cached,
            "prefix_cache_hit_rate": s.cache.hit_rate, "num_preemptions": s.num_preemptions,
        }


def _grammar_ended(grammar, token: int) -> bool:
    """Advance a constrained request's grammar by its new output token: True when the output is complete (the
    grammar took its end, e.g. EOS under ignore_eos) or the token breaks it (one sampled elsewhere, which the mask
    did not see): either way nothing valid can follow."""
    return not grammar.accept(token) or grammar.terminated


def _completion(req: Request) -> Completion:
    assert req.finish_reason is not None
    return Completion(
        request_id=req.request_id, prompt_token_ids=req.prompt_token_ids, token_ids=req.output_token_ids,
        text=req.output_text, logprobs=req.output_logprobs, top_logprobs=req.output_top_logprobs,
        finish_reason=req.finish_reason.value, stop_reason=req.stop_reason,
        num_cached_tokens=req.num_cached_tokens)


def _maybe_tokenizer(model_dir: Path) -> Tokenizer | None:
    """The folder's tokenizer, or None for a weights-only folder (token-id prompts still work)."""
    if not (model_dir / "tokenizer.json").is_file():
        return None
    return Tokenizer.from_dir(model_dir)

