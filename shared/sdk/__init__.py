"""The Python client SDK of a moemesh gateway (imports grpc and protobuf only, never torch).

    from moemesh.sdk import MeshClient

    with MeshClient("127.0.0.1:50051", timeout_s=60) as mesh:
        done = mesh.chat([{"role": "user", "content": "Hi!"}], max_tokens=32, temperature=0)
        print(done.text, done.finish_reason, done.usage)

A locked-down mesh: `MeshClient(target, api_key="KEY", tls_ca="ca.crt", tls_cert="client.crt",
tls_key="client.key")` (the key also from $MOEMESH_API_KEY).
"""

from moemesh.sdk.aio import AsyncMeshClient
from moemesh.sdk.client import MeshClient
from moemesh.sdk.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    MeshError,
    NotFoundError,
    PermissionDeniedError,
    RequestCancelledError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from moemesh.sdk.results import Chunk, Completion, ModelInfo, ToolCall, ToolCallDelta, Usage
from moemesh.sdk.retry import RetryPolicy

__all__ = [
    "AsyncMeshClient",
    "Chunk",
    "Completion",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "MeshClient",
    "MeshError",
    "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "RequestCancelledError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "ToolCall",
    "ToolCallDelta",
    "UnauthenticatedError",
    "UnavailableError",
    "Usage",
]
