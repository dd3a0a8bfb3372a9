"""When and how long to wait before trying a call again, and the deadline that bounds all tries."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, on UNAVAILABLE only, and never once a token was received.

    Only UNAVAILABLE is retried: the request did not run (gateway unreachable, no worker yet), so a
    second try cannot produce a duplicate completion. A stream that already delivered tokens is never
    retried from its start, or the caller would see them twice: with several gateways it is resumed after
    them instead (`moemesh.sdk.failover`).
    """

    retries: int = 3
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("backoff must satisfy 0 <= initial_backoff_s <= max_backoff_s")

    def backoff_s(self, attempt: int) -> float:
        """Wait before retry number `attempt` (0-based): half fixed, half random, so clients spread out."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** attempt)
        return cap / 2 + random.uniform(0, cap / 2)

    def delay_s(self, code: grpc.StatusCode | None, attempt: int, received: bool,
                deadline: Deadline) -> float | None:
        """Seconds to wait before the next try; None when the error must be raised instead."""
        if code != grpc.StatusCode.UNAVAILABLE or received or attempt >= self.retries:
            return None
        delay = self.backoff_s(attempt)
        left = deadline.remaining_s()
        if left is not None and delay >= left:
            return None
        return delay


class Deadline:
    """The end of a call, all tries included; None means no deadline."""

    def __init__(self, timeout_s: float | None) -> None:
        self._end = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining_s(self) -> float | None:
        """Seconds left (never negative), or None without a deadline."""
        return None if self._end is None else max(self._end - time.monotonic(), 0.0)
