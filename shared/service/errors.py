"""Errors that cross a service boundary, mapped to gRPC status codes in one place.

Servicers raise `ServiceError` subclasses (or the engine's own input errors); the interceptor in
`server.py` turns each into its status code and message, so a client sees a clear error, never a
traceback, and no servicer repeats the mapping.

RESOURCE_EXHAUSTED (a full queue, no free KV pages, too many requests in flight) carries a retry hint:
`retry_hint_s(exc)` seconds, sent as the trailing metadata `retry-after-ms` (`trailing_metadata_of`)
on gRPC and as `Retry-After` on REST. A refusal without a hint of its own gets `DEFAULT_RETRY_AFTER_S`.

UNAVAILABLE has two causes a router must tell apart: the service itself cannot serve (it is loading,
draining, its EP group died, or the call never reached it), or it is fine but a peer it needed for
this request failed (the KV handoff's other side, kvtransfer). The second is `PeerUnavailable`, sent
with the trailing metadata `moemesh-unavailable-cause: peer` (`is_peer_failure` reads it), so the
gateway keeps routing other requests to the worker that only reported the failure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import grpc

# Trailing metadata key of the retry hint, in whole milliseconds (gRPC keys are lower case).
RETRY_AFTER_KEY = "retry-after-ms"
# About how long a full queue takes to make room on a busy mesh (requests finish in seconds).
DEFAULT_RETRY_AFTER_S = 1.0
# Trailing metadata key (and value) marking an UNAVAILABLE as a peer's failure, not the service's own.
UNAVAILABLE_CAUSE_KEY = "moemesh-unavailable-cause"
PEER_CAUSE = "peer"


class ServiceError(Exception):
    """An error with a gRPC status code; `str(e)` is what the client sees."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    """Out of capacity for now; `retry_after_s` (None: the default) says when trying again makes sense."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class PeerUnavailable(Unavailable):
    """This service is fine, but a peer it needed for the request failed (the KV handoff's other side,
    kvtransfer); it can take other requests."""


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Aborted(ServiceError):
    code = grpc.StatusCode.ABORTED


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status a known exception maps to; None for anything else (a bug: INTERNAL, logged)."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    # The engine's and the model's input errors are ValueErrors with messages meant for users.
    from moemesh.engine.errors import EngineDead, KvCacheTooSmall, QueueFull, RequestTooLong
    from moemesh.engine.sampling_params import InvalidParameter
    from moemesh.model.tokenizer import TokenizerError

    # Capacity, not input: another worker (or this one, later) can take the request.
    if isinstance(exc, (QueueFull, KvCacheTooSmall)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, (InvalidParameter, RequestTooLong, TokenizerError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    from google.protobuf.message import DecodeError

    if isinstance(exc, DecodeError):  # a streamed request message that does not parse
        return grpc.StatusCode.INVALID_ARGUMENT, f"a request message is not valid protobuf: {exc}"
    if isinstance(exc, EngineDead):  # this worker cannot serve any more; another may
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    return None


def retry_hint_s(exc: BaseException) -> float | None:
    """Seconds a client should wait before retrying after `exc`: its own hint (`retry_after_s`), else
    DEFAULT_RETRY_AFTER_S, for what maps to RESOURCE_EXHAUSTED; None for every other error."""
    mapped = status_of(exc)
    if mapped is None or mapped[0] != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    hint = getattr(exc, "retry_after_s", None)
    return float(hint) if isinstance(hint, (int, float)) and math.isfinite(hint) and hint >= 0 \
        else DEFAULT_RETRY_AFTER_S


def trailing_metadata_of(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of the status `exc` maps to: `retry-after-ms` for RESOURCE_EXHAUSTED, the
    peer-failure marker for PeerUnavailable."""
    if isinstance(exc, PeerUnavailable):
        return ((UNAVAILABLE_CAUSE_KEY, PEER_CAUSE),)
    seconds = retry_hint_s(exc)
    return () if seconds is None else ((RETRY_AFTER_KEY, str(math.ceil(seconds * 1000))),)


def is_peer_failure(metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """Whether a call's trailing metadata marks its UNAVAILABLE as a peer's failure (PeerUnavailable)."""
    return any(key == UNAVAILABLE_CAUSE_KEY and value == PEER_CAUSE for key, value in metadata or ())


def retry_after_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> float | None:
    """The hint in a call's trailing metadata (`call.trailing_metadata()`), in seconds; None without one."""
    for key, value in metadata or ():
        if key == RETRY_AFTER_KEY:
            try:
                ms = int(value)
            except (TypeError, ValueError):
                return None
            return ms / 1000 if ms >= 0 else None
    return None
