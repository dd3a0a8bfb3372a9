"""Warm an engine up before it takes requests, then forget the warm-up was there.

The first forward of a process pays one-time costs that no later one does: the thread pool's start, lazy
initialisation in torch and the kernels, and on a CPU oneDNN's creation of a primitive for every new matrix
shape. Measured on the small benchmark shape (docs/benchmarks.md): the first 128-token prefill of a fresh engine
took 123 ms against 24 ms for the next, and each new step size cost another 7-13 ms the first time. A server's
first users should not pay that, so a worker runs, before it registers: a prefill of a typical prompt and one of
its whole step budget, and a shrinking decode batch (B, B-1, ... 1 sequences), all greedy (the shared sampling
generator is not drawn from, so sampled outputs stay as they would have been). Then it empties the prefix cache
of the warm-up's pages and zeroes what the warm-up counted (prefix-cache hits, expert load): nothing of it is
visible to a request, to the metrics or to the balancer.

Not for an EP rank: its forwards are collectives that every rank of the group must join together.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from moemesh.device import bind_thread
from moemesh.engine.engine import Engine
from moemesh.engine.errors import KvCacheTooSmall, QueueFull, RequestTooLong
from moemesh.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

# Prompt tokens per warm-up prefill, below the step budget (which is warmed too). Short: the one-time costs are
# what a warm-up is for; a prefill of each exact size a server will see is out of reach (sizes vary freely).
PREFILL_LADDER = (128,)
DECODE_BATCH = 4  # the largest warm-up decode batch (then 3, 2, 1)
DECODE_PROMPT = 8  # tokens in each prompt of the decode warm-up


@dataclass
class WarmUp:
    """What a warm-up ran: prefill sizes (tokens), decode batch sizes, and the seconds it took."""

    prefill_sizes: list[int] = field(default_factory=list)
    decode_batches: list[int] = field(default_factory=list)
    seconds: float = 0.0


def plan(engine: Engine) -> tuple[list[int], int]:
    """The prefill sizes and the largest decode batch that this engine's step budget, batch limit, context limit
    and KV cache allow (a warm-up sequence holds its pages alone, so each must fit the cache with room to decode)."""
    sched = engine.scheduler.cfg
    room = sched.num_pages * sched.page_size - 2 * sched.page_size
    longest = min(sched.max_num_batched_tokens, engine.max_model_len - 2, room)
    sizes = [n for n in PREFILL_LADDER if n < longest] + ([longest] if longest >= 1 else [])
    batch = min(DECODE_BATCH, sched.max_num_seqs, sched.max_num_batched_tokens // DECODE_PROMPT)
    # Every sequence of the decode warm-up lives together: prompt, its outputs, and a page's slack each.
    while batch > 1 and batch * (DECODE_PROMPT + batch + 1 + sched.page_size) > room:
        batch -= 1
    if engine.max_model_len < DECODE_PROMPT + batch + 1 or room < DECODE_PROMPT + 2:
        batch = 0
    return sizes, batch


def warm_up(engine: Engine) -> WarmUp:
    """Run the warm-up forwards of `plan` on `engine` (idle, not part of an EP group), then reset the prefix cache
    and the expert-load counters. A size the engine refuses at admission is skipped; a failing forward raises."""
    if engine.ep is not None:
        raise ValueError("an EP rank cannot warm up alone: its forwards are the group's collectives")
    if engine.has_unfinished():
        raise RuntimeError("warm up an engine before it takes requests")
    t0 = time.perf_counter()
    bind_thread(engine.cfg.device)  # CUDA's current device is per thread, and this may not be the loading one
    sizes, batch = plan(engine)
    vocab = engine.model.config.vocab_size
    done = WarmUp()
    for n in sizes:
        # Distinct tokens per size: no prompt reuses another's cached prefix, so each prefill computes all n.
        if _run(engine, [[(n * 7 + i) % vocab for i in range(n)]], [1]):
            done.prefill_sizes.append(n)
    if batch:
        prompts = [[(1000 + b * DECODE_PROMPT + i) % vocab for i in range(DECODE_PROMPT)] for b in range(batch)]
        # Sequence b stops after b + 2 tokens: the batch decodes at every size from `batch` down to 1.
        if _run(engine, prompts, [b + 2 for b in range(batch)]):
            done.decode_batches = list(range(batch, 0, -1))
    engine.scheduler.cache.reset()
    engine.scheduler.cache.reset_stats()
    if engine.expert_load is not None:
        engine.expert_load.reset()
    done.seconds = time.perf_counter() - t0
    log.info("warmed up in %.2f s: prefill of %s tokens, decode batches %s..1", done.seconds, done.prefill_sizes,
             done.decode_batches[0] if done.decode_batches else 0)
    return done


def _run(engine: Engine, prompts: list[list[int]], max_tokens: list[int]) -> bool:
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens]
    try:
        engine.generate(prompts, params)
    except (KvCacheTooSmall, RequestTooLong, QueueFull) as e:
        log.debug("warm-up step skipped: %s", e)
        for rid in list(engine.requests):
            engine.abort(rid)
        return False
    return True
