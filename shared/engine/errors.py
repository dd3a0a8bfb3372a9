"""Engine errors that servers map to status codes (torch-free: the gateway imports it without torch)."""

# What a refused request is told to wait before it tries again: queues drain as requests finish, which
# on a busy worker takes about a second (an estimate, not a promise; clients add their own backoff).
QUEUE_FULL_RETRY_AFTER_S = 1.0


class EngineDead(RuntimeError):
    """The engine thread failed (a bug, or a peer rank of its EP group gone); nothing more will run on it."""


class RequestTooLong(ValueError):
    """The prompt does not fit the context (INVALID_ARGUMENT: the same request will never fit)."""


class KvCacheTooSmall(RequestTooLong):
    """The prompt needs more KV pages than this engine's whole cache holds (RESOURCE_EXHAUSTED: a worker
    with a larger cache could take it; waiting here would be endless)."""


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its bound (RESOURCE_EXHAUSTED); `retry_after_s` is the hint."""

    def __init__(self, message: str, retry_after_s: float = QUEUE_FULL_RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
