"""Errors in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`, with the right HTTP status.

The core raises `ServiceError`s carrying gRPC status codes; they map to HTTP here, once, as
grpc-gateway maps them. Request validation (malformed JSON included) is a 400, never FastAPI's 422;
anything unexpected is a logged 500 that shows no traceback. A 429 (RESOURCE_EXHAUSTED: queues full, no
free KV pages, too many requests in flight) carries `Retry-After` in whole seconds, at least 1.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from moemesh.engine.errors import QueueFull, RequestTooLong
from moemesh.engine.sampling_params import InvalidParameter
from moemesh.model.tokenizer import TokenizerError
from moemesh.service.errors import ServiceError, retry_hint_s, status_of
from moemesh.services.gateway.rest.schemas import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# OpenAI's error `type` for each status (its own names where it has one).
_ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    429: "rate_limit_error",
    499: "cancelled_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}

# The statuses the generating endpoints document (401 is added where a key is required).
DOCUMENTED = {
    400: "Bad parameters, malformed JSON, or a prompt that does not fit the context.",
    404: "The model is not served here.",
    429: "The mesh is at capacity (queues full, no free KV pages, or too many requests in flight); retry "
         "after the `Retry-After` header's seconds.",
    503: "No worker can take the request now, or the gateway is shutting down (it serves no new requests).",
    504: "The request passed its deadline (the gateway's request timeout).",
}


class ApiError(Exception):
    """An error raised by the REST layer itself, already in HTTP terms."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


UNAUTHORIZED = "The API key is missing or wrong (send `Authorization: Bearer KEY`)."


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status of a gRPC status code (500 for INTERNAL, UNKNOWN, DATA_LOSS)."""
    return _HTTP_STATUS.get(code, 500)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error object for `status`."""
    detail = ErrorDetail(message=message, type=_ERROR_TYPE.get(status, "server_error"), param=param, code=code)
    return ErrorResponse(error=detail).model_dump()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def retry_after_headers(exc: BaseException) -> dict[str, str] | None:
    """`Retry-After` (whole seconds, >= 1: HTTP has no finer unit) for an error that carries a retry hint."""
    hint = retry_hint_s(exc)
    return None if hint is None else {"Retry-After": str(max(1, math.ceil(hint)))}


def describe(exc: BaseException) -> tuple[int, str, str | None, str | None]:
    """(status, message, param, code) of any exception; unexpected ones are logged and hidden."""
    if isinstance(exc, ApiError):
        return exc.status, str(exc), exc.param, exc.code
    known = status_of(exc)
    if known is not None:
        code, message = known
        if code == grpc.StatusCode.NOT_FOUND:  # the core's only NOT_FOUND: an unknown model
            return 404, message, "model", "model_not_found"
        return http_status(code), message, None, code.name.lower()
    log.error("REST request failed unexpectedly", exc_info=exc)
    return 500, f"internal error ({type(exc).__name__}); see the gateway's log", None, "internal"


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming the bad fields (at most three), and the first field's path as `param`."""
    parts, first = [], None
    for err in exc.errors()[:3]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        first = first or where or None
        if err.get("type") == "json_invalid":
            return f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request", first


def install(app: FastAPI) -> None:
    """Make every error of `app` an OpenAI error body."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(400, message, param, "invalid_request")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    async def _known(request: Request, exc: Exception) -> JSONResponse:
        status, message, param, code = describe(exc)
        return error_response(status, message, param, code, headers=retry_after_headers(exc))

    # Expected errors get their own handlers; `Exception`'s is Starlette's last resort, which also
    # lets the server log the traceback of what is a bug.
    # QueueFull is no ValueError: without its own handler it would reach `Exception`'s, logged as a bug.
    for cls in (ApiError, ServiceError, InvalidParameter, RequestTooLong, QueueFull, TokenizerError, Exception):
        app.add_exception_handler(cls, _known)
