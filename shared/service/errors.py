"""Errors that cross a service boundary, mapped to gRPC status codes in one place.

Servicers raise `ServiceError` subclasses (or the engine's own input errors); the interceptor in
`server.py` turns each into its status code and message, so a client sees a clear error, never a
traceback, and no servicer repeats the mapping.
"""

from __future__ import annotations

import grpc


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
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Aborted(ServiceError):
    code = grpc.StatusCode.ABORTED


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status a known exception maps to; None for anything else (a bug: INTERNAL, logged)."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    # The engine's and the model's input errors are ValueErrors with messages meant for users.
    from shared.engine.errors import EngineDead
    from shared.engine.sampling_params import InvalidParameter
    from shared.engine.scheduler import RequestTooLong
    from shared.model.tokenizer import TokenizerError

    if isinstance(exc, (InvalidParameter, RequestTooLong, TokenizerError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, EngineDead):  # this worker cannot serve any more; another may
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    return None
