"""The SDK's errors: one class per gRPC status a caller may want to handle, all `MeshError`s."""

from __future__ import annotations

import grpc


class MeshError(Exception):
    """A call to the mesh failed; `code` is its gRPC status code, `message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgumentError(MeshError):
    """The request is malformed: a bad parameter, an empty or too long prompt."""


class NotFoundError(MeshError):
    """The named model is not served."""


class UnavailableError(MeshError):
    """The gateway or the workers it needs cannot be reached (retried before any token arrived)."""


class DeadlineExceededError(MeshError):
    """The call's deadline passed before it ended."""


class ResourceExhaustedError(MeshError):
    """The mesh is out of capacity for this request."""


class FailedPreconditionError(MeshError):
    """The mesh is not in a state to run the request (e.g. mismatched versions)."""


class RequestCancelledError(MeshError):
    """The call was cancelled."""


class InternalError(MeshError):
    """A bug on the server side."""


class UnauthenticatedError(MeshError):
    """The gateway wants an API key (`api_key=`, $MOEMESH_API_KEY) and got none or a wrong one."""


class PermissionDeniedError(MeshError):
    """The caller is known but may not do this."""


_BY_CODE: dict[grpc.StatusCode, type[MeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


def error_for(code: grpc.StatusCode, message: str) -> MeshError:
    """The MeshError subclass for `code`."""
    return _BY_CODE.get(code, MeshError)(code, message)


def from_rpc_error(err: grpc.RpcError) -> MeshError:
    """The MeshError of a failed call (sync or asyncio)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return error_for(code or grpc.StatusCode.UNKNOWN, details or "")
