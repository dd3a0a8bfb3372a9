"""Why a kvtransfer operation was refused, without gRPC: the servicer maps each reason to a status code.

Rooms and the relay raise `KvTransferError(reason, message)`; a failed room remembers the reason it
failed for, so every later call on it (a waiting resolver, a watcher, a relay stream) raises the same.
"""

from __future__ import annotations

import enum


class Reason(enum.Enum):
    """The kind of refusal; one status code each (see `servicer.STATUS_OF`)."""

    INVALID = "invalid"  # a malformed request (INVALID_ARGUMENT)
    NOT_FOUND = "not_found"  # no such room (NOT_FOUND)
    CONFLICT = "conflict"  # the room is in the wrong state for this call (FAILED_PRECONDITION)
    INCOMPATIBLE = "incompatible"  # sender and receiver KV layouts differ (FAILED_PRECONDITION)
    TIMED_OUT = "timed_out"  # a lease or a bounded wait ran out (DEADLINE_EXCEEDED)
    ABORTED = "aborted"  # a side reported failure, or the other side's stream broke (ABORTED)
    EXHAUSTED = "exhausted"  # too many rooms or too many buffered bytes (RESOURCE_EXHAUSTED)
    SHUTTING_DOWN = "shutting_down"  # the service is stopping (UNAVAILABLE)


class KvTransferError(Exception):
    """A refusal with a reason; `str(e)` is the message a client sees."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
