"""The Python client SDK of a moemesh gateway (imports grpc and protobuf only, never torch).

    from shared.sdk import MeshClient

    with MeshClient("127.0.0.1:50051", timeout_s=60) as mesh:
        done = mesh.chat([{"role": "user", "content": "Hi!"}], max_tokens=32, temperature=0)
        print(done.text, done.finish_reason, done.usage)
"""

from shared.sdk.aio import AsyncMeshClient
from shared.sdk.client import MeshClient
from shared.sdk.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    MeshError,
    NotFoundError,
    RequestCancelledError,
    ResourceExhaustedError,
    UnavailableError,
)
from shared.sdk.results import Chunk, Completion, ModelInfo, Usage
from shared.sdk.retry import RetryPolicy

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
    "RequestCancelledError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "UnavailableError",
    "Usage",
]
