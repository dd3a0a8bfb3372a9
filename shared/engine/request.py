"""One request's state inside the engine: its tokens, its pages, how far its KV is computed."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moemesh.engine.sampling_params import SamplingParams

if TYPE_CHECKING:  # the gateway uses these types without torch installed
    import torch


class RequestStatus(enum.Enum):
    WAITING = "waiting"        # queued, owns no pages
    PREFILLING = "prefilling"  # admitted, pages reserved, prompt KV being computed chunk by chunk
    RUNNING = "running"        # decoding
    RESERVING = "reserving"    # decode side of PD: waiting for pages to receive the prompt's KV into
    TRANSFERRING = "transferring"  # pages reserved; the prompt's KV is arriving from a prefill worker
    HELD = "held"              # prefill side of PD: first token sampled, pages kept until the KV is sent
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"      # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"    # cancelled by the caller


@dataclass
class RequestTiming:
    """When a request passed each point of its life, in `time.monotonic_ns()`; 0 = not (yet) reached.

    Written by the engine thread only (a clock read per step, not per token); read by the asyncio
    side, which turns them into spans and latency metrics once the point is passed.
    """

    arrival_ns: int = field(default_factory=time.monotonic_ns)  # the engine took the request
    scheduled_ns: int = 0     # first in a step's batch (prefill started)
    reserved_ns: int = 0      # PD decode: KV pages reserved, the KV may arrive
    committed_ns: int = 0     # PD decode: the prompt's KV is in place
    first_token_ns: int = 0   # the first output token was produced
    finished_ns: int = 0      # ended (finished, aborted, or PD prefill: pages released)


@dataclass(eq=False)
class Request:
    """A sequence being served. Token accounting:

    `all_token_ids` = prompt + outputs; `num_computed` of them have KV in the request's `pages`.
    A step feeds `all_token_ids[num_computed : num_computed + n]` and samples when it reaches the end.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached_tokens: int = 0   # prefix-cache hit at the latest admission
    num_preemptions: int = 0
    prefix_node: Any = None      # the radix node this request holds locked (its cached prefix)
    generator: torch.Generator | None = None
    output_text: str = ""
    num_sent_chars: int = 0      # how much of output_text has been streamed out
    prefill_only: bool = False   # PD prefill: stop after the first token and hold the pages
    num_kv_emitted: int = 0      # PD prefill: tokens whose KV rows were handed to the sender
    detokenizer: Any = None
    grammar: Any = None          # structured output: its GrammarState (moemesh.engine.grammar), else None
    # prompt_logprobs: per prompt position, (logprob, top) of that token given the ones before; [0] stays None
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    timing: RequestTiming = field(default_factory=RequestTiming)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass
class RequestOutput:
    """What one step produced for one request: the new tokens and text, and whether it ended."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[float]
    new_top_logprobs: list[list[tuple[int, float]]]
    finished: bool
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    prefill_done: bool = False   # PD prefill: the first token is sampled; the request holds its pages
    # PD prefill: the first token's text when the decode worker's first output will begin with exactly it (None
    # when a stop string, a resumed request or prompt logprobs make that unsure); see Engine._early_text
    first_text: str | None = None
    # With the first token of a request that asked for prompt_logprobs: Request.prompt_logprobs
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    time_ns: int = 0             # time.monotonic_ns() when the step that produced it ended
    timing: RequestTiming | None = None  # the request's timestamps (the engine's own object, read-only)
