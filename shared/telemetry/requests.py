"""A worker request's telemetry: its engine timestamps become spans and latency observations at its end.

The engine thread stamps each request (`RequestTiming`: arrival, first scheduled, KV reserved and
committed, first token, finished, all `time.monotonic_ns()`) and each output (`time_ns`, the end of
the step that made it). Nothing here runs on the engine thread: the servicer feeds the events it
reads to a `RequestTelemetry` and calls `finish()` once, when the request is over however it ended.

Spans (children of the span current when the telemetry was made, the RPC's SERVER span):
    prefill.queue_wait   arrival -> first scheduled
    prefill.forward      first scheduled -> first token
    decode.first_token   arrival -> first token, with children
        decode.queue_wait    arrival -> first scheduled (colocated) or KV pages reserved (PD)
        decode.kv_transfer   KV pages reserved -> the prompt's KV in place (PD)
        decode.prefill       first scheduled -> first token (colocated)
    decode.decode        first token -> finished
A point never reached ends its spans at the request's end, marked as errors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from moemesh.telemetry import metrics
from moemesh.telemetry.tracing import record_span

_NS = 1e-9

log = logging.getLogger(__name__)


class RequestTelemetry:
    """Observes one request on a worker of `role` ("prefill" or "decode")."""

    def __init__(self, role: str, request_id: str, num_prompt_tokens: int) -> None:
        self.role = role
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.parent = otel_context.get_current()
        self.timing: Any = None  # the engine's RequestTiming, once an event brought it
        self.num_output_tokens = 0
        self.num_cached_tokens = 0
        self.outcome: str | None = None
        self._last_ns = 0
        self._itl = metrics.INTER_TOKEN_LATENCY.labels(role)
        self._done = False

    def on_reserved(self, timing: Any) -> None:
        """PD decode: the request's pages are reserved."""
        if timing is not None:
            self.timing = timing

    def on_output(self, out: Any) -> None:
        """A RequestOutput of the request (per step: a few attribute reads and one histogram observation)."""
        if out.timing is not None:
            self.timing = out.timing
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        if out.prefill_done:  # PD prefill: its token is the decode side's first output, counted there
            return
        n = len(out.new_token_ids)
        if n and out.time_ns:
            if self._last_ns:
                gap = (out.time_ns - self._last_ns) * _NS / n
                for _ in range(n):
                    self._itl.observe(gap)
            self._last_ns = out.time_ns
        self.num_output_tokens += n
        if out.finished and out.finish_reason is not None:
            self.outcome = getattr(out.finish_reason, "value", str(out.finish_reason))

    def finish(self, error: BaseException | None = None) -> None:
        """Record the request's spans and metrics (once; later calls do nothing). Never raises: a
        telemetry bug must not fail the request."""
        if self._done:
            return
        self._done = True
        try:
            self._finish(error)
        except Exception:
            log.warning("recording the telemetry of request %s failed", self.request_id, exc_info=True)

    def _finish(self, error: BaseException | None) -> None:
        now = time.monotonic_ns()
        if error is not None:
            cancelled = isinstance(error, (asyncio.CancelledError, GeneratorExit))
            self.outcome = "cancelled" if cancelled else "error"
            reason = "cancelled" if cancelled else f"{type(error).__name__}: {error}"
        else:
            reason = None
        outcome = self.outcome or "ok"
        role = self.role
        metrics.REQUESTS.labels(role, outcome).inc()
        if self.num_output_tokens:
            metrics.GENERATION_TOKENS.labels(role).inc(self.num_output_tokens)
        t = self.timing
        if t is None:
            return  # the engine never took it (refused at once): the RPC's span says why
        metrics.PROMPT_TOKENS.labels(role).inc(self.num_prompt_tokens)
        end = t.finished_ns or now
        taken = t.reserved_ns or t.scheduled_ns
        if taken:
            metrics.REQUEST_QUEUE_TIME.labels(role).observe((taken - t.arrival_ns) * _NS)
        if t.first_token_ns:
            metrics.TIME_TO_FIRST_TOKEN.labels(role).observe((t.first_token_ns - t.arrival_ns) * _NS)
        metrics.E2E_REQUEST_LATENCY.labels(role).observe((end - t.arrival_ns) * _NS)
        if trace.get_current_span(self.parent).get_span_context().trace_flags.sampled:
            self._spans(t, end, reason)

    def _spans(self, t: Any, end: int, reason: str | None) -> None:
        attrs = {"moemesh.request_id": self.request_id, "moemesh.num_prompt_tokens": self.num_prompt_tokens,
                 "moemesh.num_cached_tokens": self.num_cached_tokens}
        missing = reason or "the request ended before this point"
        offset = time.time_ns() - time.monotonic_ns()

        def span(name: str, start: int, stop: int, parent: Any, attributes: dict, error: str | None = None) -> Any:
            return record_span(name, start, stop, parent, attributes, error, offset_ns=offset)

        def upto(point: int) -> tuple[int, str | None]:
            return (point, None) if point else (end, missing)

        if self.role == "prefill":
            stop, err = upto(t.scheduled_ns)
            span("prefill.queue_wait", t.arrival_ns, stop, self.parent, attrs, err)
            if t.scheduled_ns:
                stop, err = upto(t.first_token_ns)
                span("prefill.forward", t.scheduled_ns, stop, self.parent, attrs, err or reason)
            return
        stop, err = upto(t.first_token_ns)
        first = span("decode.first_token", t.arrival_ns, stop, self.parent, attrs, err)
        inside = trace.set_span_in_context(first, self.parent)
        if t.reserved_ns or not t.scheduled_ns:  # PD (or never taken up)
            queued, err = upto(t.reserved_ns)
            span("decode.queue_wait", t.arrival_ns, queued, inside, attrs, err)
            if t.reserved_ns:
                stop, err = upto(t.committed_ns)
                span("decode.kv_transfer", t.reserved_ns, stop, inside, attrs, err)
        else:
            span("decode.queue_wait", t.arrival_ns, t.scheduled_ns, inside, attrs)
            stop, err = upto(t.first_token_ns)
            span("decode.prefill", t.scheduled_ns, stop, inside, attrs, err)
        if t.first_token_ns:
            span("decode.decode", t.first_token_ns, end, self.parent,
                 {**attrs, "moemesh.num_output_tokens": self.num_output_tokens,
                  "moemesh.outcome": self.outcome or "ok"}, reason)
