"""The gateway's gRPC servicers: thin shells over GatewayCore and WorkerRegistry.

Errors are raised, not set on the context: the server's interceptor maps them to status codes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from moemesh.services.gateway.core import GatewayCore
from moemesh.services.gateway.registry import WorkerRegistry
from moemesh.v1 import gateway_pb2, gateway_pb2_grpc

# grpc reports "no deadline" as None or as an effectively infinite number, depending on the version.
_NO_DEADLINE_S = 10**8


def client_timeout_s(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds left of the client's deadline; None when it set none."""
    remaining = context.time_remaining()
    if remaining is None or remaining > _NO_DEADLINE_S:
        return None
    return remaining


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """moemesh.v1.Gateway."""

    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    async def Generate(self, request: gateway_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        # A client that goes away cancels this handler; the core cancels and aborts the downstream calls.
        async for response in self.core.generate(request, timeout_s=client_timeout_s(context)):
            yield response

    async def Tokenize(self, request: gateway_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> gateway_pb2.TokenizeResponse:
        return self.core.tokenize(request)

    async def ListModels(self, request: gateway_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> gateway_pb2.ListModelsResponse:
        return self.core.list_models()


class WorkerRegistryServicer(gateway_pb2_grpc.WorkerRegistryServicer):
    """moemesh.v1.WorkerRegistry."""

    def __init__(self, registry: WorkerRegistry) -> None:
        self.registry = registry

    async def Register(self, request: gateway_pb2.RegisterWorkerRequest,
                       context: grpc.aio.ServicerContext) -> gateway_pb2.RegisterWorkerResponse:
        return self.registry.register(request)

    async def Heartbeat(self, request: gateway_pb2.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> gateway_pb2.HeartbeatResponse:
        return self.registry.heartbeat(request)

    async def Deregister(self, request: gateway_pb2.DeregisterWorkerRequest,
                         context: grpc.aio.ServicerContext) -> gateway_pb2.DeregisterWorkerResponse:
        return self.registry.deregister(request)
