"""AsyncMeshClient: the asyncio client of the gateway's gRPC API."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from moemesh.sdk.channel import PathOrPem, aio_channel, api_key_metadata, client_tls
from moemesh.sdk.chat import ToolChoice
from moemesh.sdk.errors import MeshError, from_rpc_error
from moemesh.sdk.failover import DEFAULT_MAX_RESUMES, Rotation, StreamFailover, parse_targets
from moemesh.sdk.messages import CompletionBuilder, chunk_from, generate_request, model_infos, tokenize_request
from moemesh.sdk.results import Chunk, Completion, ModelInfo
from moemesh.sdk.retry import Deadline, RetryPolicy
from moemesh.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")


class AsyncMeshClient:
    """`MeshClient` for asyncio: the same methods, awaited; `stream`/`chat_stream` are async iterators.

        async with AsyncMeshClient("127.0.0.1:50051") as mesh:
            async for chunk in mesh.stream("Once upon a time", max_tokens=32):
                print(chunk.text, end="")

    `api_key`, `tls_*`, several gateways as `target` and `max_resumes` as for `MeshClient`. The channels open on
    first use, inside the running event loop. To cancel a stream left early, close it
    (`contextlib.aclosing(mesh.stream(...))`) or cancel the task iterating it.
    """

    def __init__(self, target: str | Sequence[str], timeout_s: float | None = None, retries: int = 3, *,
                 retry_policy: RetryPolicy | None = None, api_key: str | None = None,
                 tls_ca: PathOrPem | None = None, tls_cert: PathOrPem | None = None,
                 tls_key: PathOrPem | None = None, tls_server_name: str | None = None,
                 max_resumes: int = DEFAULT_MAX_RESUMES) -> None:
        self.targets = parse_targets(target)
        self.target = ",".join(self.targets)
        self.timeout_s = timeout_s
        self.retry_policy = retry_policy if retry_policy is not None else RetryPolicy(retries=retries)
        self.max_resumes = max_resumes
        self._metadata = api_key_metadata(api_key)
        self._tls = client_tls(tls_ca, tls_cert, tls_key, tls_server_name)
        self._channels: dict[int, grpc.aio.Channel] = {}
        self._stubs: dict[int, gateway_pb2_grpc.GatewayStub] = {}
        self._rotation = Rotation(len(self.targets))

    async def __aenter__(self) -> AsyncMeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channels; streams still open are cancelled."""
        channels, self._channels, self._stubs = self._channels, {}, {}
        for channel in channels.values():
            await channel.close()

    def _gateway(self, target: int) -> gateway_pb2_grpc.GatewayStub:
        if target not in self._stubs:
            self._channels[target] = aio_channel(self.targets[target], self._tls)
            self._stubs[target] = gateway_pb2_grpc.GatewayStub(self._channels[target])
        return self._stubs[target]

    # -- completions

    async def generate(self, prompt: str | None = None, token_ids: Sequence[int] | None = None, *,
                       timeout_s: float | None = None, model: str | None = None, request_id: str | None = None,
                       **sampling: Any) -> Completion:
        """Complete a text prompt (BOS added) or token ids; returns when the request finishes."""
        return await _collect(self.stream(prompt, token_ids, timeout_s=timeout_s, model=model,
                                          request_id=request_id, **sampling))

    def stream(self, prompt: str | None = None, token_ids: Sequence[int] | None = None, *,
               timeout_s: float | None = None, model: str | None = None, request_id: str | None = None,
               **sampling: Any) -> AsyncIterator[Chunk]:
        """Like `generate`, yielding chunks as tokens are made."""
        req = generate_request(prompt, token_ids, model=model, request_id=request_id, **sampling)
        return self._stream(req, timeout_s)

    async def chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                   tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: ToolChoice = None,
                   chat_template_kwargs: Mapping[str, Any] | None = None, continue_final_message: bool = False,
                   timeout_s: float | None = None, model: str | None = None, request_id: str | None = None,
                   **sampling: Any) -> Completion:
        """Answer chat messages rendered with the chat template (tools and options as `MeshClient.chat`)."""
        return await _collect(self.chat_stream(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, tool_choice=tool_choice,
            chat_template_kwargs=chat_template_kwargs, continue_final_message=continue_final_message,
            timeout_s=timeout_s, model=model, request_id=request_id, **sampling))

    def chat_stream(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: ToolChoice = None,
                    chat_template_kwargs: Mapping[str, Any] | None = None, continue_final_message: bool = False,
                    timeout_s: float | None = None, model: str | None = None, request_id: str | None = None,
                    **sampling: Any) -> AsyncIterator[Chunk]:
        """Like `chat`, yielding chunks as tokens are made (tool calls as `ToolCallDelta` pieces)."""
        req = generate_request(messages=messages, add_generation_prompt=add_generation_prompt, model=model,
                               request_id=request_id, tools=tools, tool_choice=tool_choice,
                               chat_template_kwargs=chat_template_kwargs,
                               continue_final_message=continue_final_message, **sampling)
        return self._stream(req, timeout_s)

    # -- other calls

    async def tokenize(self, text: str | None = None, messages: Sequence[Mapping[str, Any]] | None = None, *,
                       add_special_tokens: bool = True, add_generation_prompt: bool = True,
                       tools: Sequence[Mapping[str, Any]] | None = None,
                       timeout_s: float | None = None, model: str | None = None) -> list[int]:
        """Token ids of `text` (BOS first when add_special_tokens) or of chat `messages`."""
        req = tokenize_request(text, messages, add_special_tokens, add_generation_prompt, model, tools)
        resp = await self._unary(lambda stub: stub.Tokenize, req, timeout_s)
        return list(resp.token_ids)

    async def list_models(self, *, timeout_s: float | None = None) -> list[ModelInfo]:
        """The models the mesh serves."""
        resp = await self._unary(lambda stub: stub.ListModels, gateway_pb2.ListModelsRequest(), timeout_s)
        return model_infos(resp)

    # -- retries

    async def _stream(self, req: gateway_pb2.GenerateRequest, timeout_s: float | None) -> AsyncIterator[Chunk]:
        tries = StreamFailover(req, self.targets, self._rotation, self.retry_policy,
                               Deadline(self.timeout_s if timeout_s is None else timeout_s), self.max_resumes)
        while True:
            call = self._gateway(tries.target).Generate(tries.request(), timeout=tries.deadline.remaining_s(),
                                                        metadata=self._metadata)
            try:
                async for resp in call:
                    tries.observe(resp)
                    yield chunk_from(resp)
                return
            except grpc.aio.AioRpcError as err:
                outcome = tries.after(err)
                if isinstance(outcome, MeshError):
                    raise outcome from None
                log.info("gateway unavailable (%s); %s at %s in %.2f s", err.details(),
                         "resuming" if tries.token_ids else "retrying", self.targets[tries.target], outcome)
            finally:
                call.cancel()  # a no-op once the call ended; otherwise the caller stopped iterating
            await asyncio.sleep(outcome)

    async def _unary(self, method: Callable[[gateway_pb2_grpc.GatewayStub], Callable[..., Awaitable[T]]],
                     req: Any, timeout_s: float | None) -> T:
        deadline = Deadline(self.timeout_s if timeout_s is None else timeout_s)
        attempt, target = 0, self._rotation.take()
        while True:
            try:
                return await method(self._gateway(target))(req, timeout=deadline.remaining_s(),
                                                           metadata=self._metadata)
            except grpc.aio.AioRpcError as err:
                delay = self.retry_policy.delay_s(err.code(), attempt, False, deadline)
                if delay is None:
                    raise from_rpc_error(err) from None
                target = self._rotation.take()
                log.info("gateway unavailable (%s); retry %d at %s in %.2f s", err.details(), attempt + 1,
                         self.targets[target], delay)
            await asyncio.sleep(delay)
            attempt += 1


async def _collect(chunks: AsyncIterator[Chunk]) -> Completion:
    builder = CompletionBuilder()
    async for chunk in chunks:
        builder.add(chunk)
    return builder.build()
