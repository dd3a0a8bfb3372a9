"""The numbers of `moemesh bench serve`: one record per request, and the aggregates over a run.

Definitions (all times are wall-clock seconds on the client, `time.perf_counter`):
  TTFT   time to first token: from the moment the request is sent (after it got its concurrency slot)
         to the arrival of the first streamed chunk that carries output text.
  ITL    inter-token latency: the gaps between consecutive chunks that carry output text (one value
         per gap; a server that packs several tokens in a chunk shows fewer, longer gaps).
  TPOT   time per output token after the first: (e2e - TTFT) / (output tokens - 1); requests with a
         single output token have none.
  E2E    end-to-end latency: from the send to the end of the stream (`[DONE]`).
  duration    from the first send of the measured requests to the end of the last one.
  throughput  completed requests, prompt tokens, output tokens (and both together) per second of duration.
  goodput     completed requests that met every SLO given (TTFT, TPOT, E2E), per second of duration.
  concurrency the mean number of requests in flight: the sum of e2e latencies / duration.
Aggregates of TTFT, TPOT and E2E are over completed requests; of ITL, over every gap of every
completed request. Percentiles interpolate linearly (numpy's default, as vLLM and SGLang report them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_NAMES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


@dataclass
class RequestResult:
    """What one request measured; times in seconds."""

    prompt_len: int  # prompt tokens, counted with the benchmark's tokenizer
    output_len: int  # output tokens asked for (max_tokens)
    success: bool = False
    error: str = ""
    send_s: float = 0.0  # when it was sent, relative to the run's start
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0  # the server's usage.completion_tokens, else the tokenizer's count of the text
    usage_prompt_tokens: int | None = None  # as the server reported them (None: no usage sent)
    usage_output_tokens: int | None = None
    chunks: int = 0  # streamed chunks that carried output text
    finish_reason: str | None = None
    text: str = ""

    @property
    def tpot_s(self) -> float | None:
        if not self.success or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class SLO:
    """Service-level objectives in milliseconds; None: not part of goodput."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def any(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2e_ms))

    def met(self, r: RequestResult) -> bool:
        if not r.success:
            return False
        if self.ttft_ms is not None and r.ttft_s * 1e3 > self.ttft_ms:
            return False
        tpot = r.tpot_s
        if self.tpot_ms is not None and tpot is not None and tpot * 1e3 > self.tpot_ms:
            return False
        return not (self.e2e_ms is not None and r.e2e_s * 1e3 > self.e2e_ms)


def stats_ms(values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float | None]:
    """mean, median, std, min, max and the given percentiles of `values_s`, in milliseconds.

    Every key is present; each is None when there are no values.
    """
    keys = ["mean_ms", "median_ms", "std_ms", "min_ms", "max_ms", *(f"p{_pct_name(p)}_ms" for p in percentiles)]
    if len(values_s) == 0:
        return dict.fromkeys(keys)
    a = np.asarray(values_s, dtype=np.float64) * 1e3
    out = {"mean_ms": float(a.mean()), "median_ms": float(np.median(a)), "std_ms": float(a.std()),
           "min_ms": float(a.min()), "max_ms": float(a.max())}
    for p in percentiles:
        out[f"p{_pct_name(p)}_ms"] = float(np.percentile(a, p))
    return out


def _pct_name(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p).replace(".", "_")


def summarize(results: Sequence[RequestResult], duration_s: float, slo: SLO | None = None,
              percentiles: Sequence[float] = (50, 90, 99), ignore_eos: bool = False) -> dict[str, Any]:
    """The run's aggregates (see the module's docstring), as a flat JSON-ready dict."""
    slo = slo or SLO()
    done = [r for r in results if r.success]
    dur = max(duration_s, 1e-9)
    total_in = sum(r.prompt_len for r in done)
    total_out = sum(r.output_tokens for r in done)
    out: dict[str, Any] = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / dur,
        "input_throughput": total_in / dur,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "concurrency": sum(r.e2e_s for r in done) / dur,
        "goodput": None,
        "good_requests": None,
    }
    if slo.any():
        good = sum(1 for r in done if slo.met(r))
        out["good_requests"] = good
        out["goodput"] = good / dur
    series = {
        "ttft": [r.ttft_s for r in done],
        "tpot": [t for t in (r.tpot_s for r in done) if t is not None],
        "itl": [gap for r in done for gap in r.itl_s],
        "e2el": [r.e2e_s for r in done],
    }
    for name in METRICS:
        for key, value in stats_ms(series[name], percentiles).items():
            out[f"{key[:-3]}_{name}_ms"] = value
    # Checks that the server did what was asked: with ignore_eos every request must give exactly
    # max_tokens; the server's prompt count must be the tokenizer's (text prompts on /v1/completions).
    out["usage_reported"] = sum(1 for r in done if r.usage_output_tokens is not None)
    out["output_len_mismatches"] = sum(1 for r in done if ignore_eos and r.output_tokens != r.output_len)
    out["prompt_len_mismatches"] = sum(
        1 for r in done if r.usage_prompt_tokens is not None and r.usage_prompt_tokens != r.prompt_len)
    return out


def per_request(results: Sequence[RequestResult]) -> dict[str, list[Any]]:
    """The per-request arrays of the JSON result (seconds, as the peers write them)."""
    return {
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens for r in results],
        "requested_output_lens": [r.output_len for r in results],
        "success": [r.success for r in results],
        "errors": [r.error for r in results],
        "send_times": [r.send_s for r in results],
        "ttfts": [r.ttft_s if r.success else None for r in results],
        "tpots": [r.tpot_s for r in results],
        "e2els": [r.e2e_s if r.success else None for r in results],
        "itls": [r.itl_s if r.success else [] for r in results],
        "chunks": [r.chunks for r in results],
        "usage_prompt_tokens": [r.usage_prompt_tokens for r in results],
        "usage_output_tokens": [r.usage_output_tokens for r in results],
        "finish_reasons": [r.finish_reason for r in results],
    }
