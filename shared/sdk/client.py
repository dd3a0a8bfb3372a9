"""MeshClient: the blocking client of the gateway's gRPC API."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from moemesh.sdk.channel import PathOrPem, api_key_metadata, client_tls, sync_channel
from moemesh.sdk.chat import ToolChoice
from moemesh.sdk.errors import MeshError, from_rpc_error
from moemesh.sdk.failover import DEFAULT_MAX_RESUMES, Rotation, StreamFailover, parse_targets
from moemesh.sdk.messages import CompletionBuilder, chunk_from, generate_request, model_infos, tokenize_request
from moemesh.sdk.results import Chunk, Completion, ModelInfo
from moemesh.sdk.retry import Deadline, RetryPolicy
from moemesh.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")


class MeshClient:
    """Calls a moemesh gateway; use as a context manager or call `close()`.

        with MeshClient("127.0.0.1:50051") as mesh:
            print(mesh.generate("The capital of France is", max_tokens=8, temperature=0).text)

    `timeout_s` is the default deadline of each call (all its retries included; None: none). Calls
    failing with UNAVAILABLE before any token arrived are retried up to `retries` times with
    exponential backoff and jitter. Errors are `moemesh.sdk.MeshError` subclasses.

    Security: `api_key` is sent as `authorization: Bearer KEY` on every call (default: the first key of
    $MOEMESH_API_KEY, if set); a wrong or missing one fails with `UnauthenticatedError`. `tls_ca` (the
    CA that signs the gateway's certificate), `tls_cert` and `tls_key` (this client's certificate, for a
    mesh running mutual TLS) are PEM file paths or bytes; any of them makes the channel TLS.
    `tls_server_name` is the name to verify in the gateway's certificate when it differs from the host.

    Several gateways: `target` may be a list of addresses (or 'h1:50051,h2:50051', or a `dns:///` name that resolves
    to several); calls take them in turn, and a stream whose gateway dies after some tokens continues at the next
    one, with nothing repeated or missing (greedy and seeded sampling give the same tokens), at most `max_resumes`
    times a call (`moemesh.sdk.failover`).

    Sampling options of generate/stream/chat/chat_stream (vLLM's names and defaults): max_tokens=16,
    temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0, frequency_penalty=0.0, presence_penalty=0.0,
    repetition_penalty=1.0, seed=None, stop=None, stop_token_ids=None, ignore_eos=False, min_tokens=0,
    logprobs=None, include_stop_str_in_output=False.
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
        self._channels = [sync_channel(t, self._tls) for t in self.targets]
        self._stubs = [gateway_pb2_grpc.GatewayStub(c) for c in self._channels]
        self._rotation = Rotation(len(self.targets))

    def __enter__(self) -> MeshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channels; streams still open are cancelled."""
        for channel in self._channels:
            channel.close()

    # -- completions

    def generate(self, prompt: str | None = None, token_ids: Sequence[int] | None = None, *,
                 timeout_s: float | None = None, model: str | None = None, request_id: str | None = None,
                 **sampling: Any) -> Completion:
        """Complete a text prompt (BOS added) or token ids; returns when the request finishes."""
        return _collect(self.stream(prompt, token_ids, timeout_s=timeout_s, model=model, request_id=request_id,
                                    **sampling))

    def stream(self, prompt: str | None = None, token_ids: Sequence[int] | None = None, *,
               timeout_s: float | None = None, model: str | None = None, request_id: str | None = None,
               **sampling: Any) -> Iterator[Chunk]:
        """Like `generate`, yielding chunks as tokens are made; leaving the loop early cancels the request."""
        req = generate_request(prompt, token_ids, model=model, request_id=request_id, **sampling)
        return self._stream(req, timeout_s)

    def chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
             tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: ToolChoice = None,
             chat_template_kwargs: Mapping[str, Any] | None = None, continue_final_message: bool = False,
             timeout_s: float | None = None, model: str | None = None, request_id: str | None = None,
             **sampling: Any) -> Completion:
        """Answer chat messages (`[{"role": "user", "content": "..."}]`) rendered with the chat template.

        Messages, `tools` and `tool_choice` ("auto", "none", "required" or {"type": "function", "function":
        {"name": ...}}) take OpenAI's shapes; the answer's `tool_calls` are the calls the model made (the
        gateway reads them with its tool-call parser), `reasoning_text` its thinking.
        `chat_template_kwargs` are extra template variables; `continue_final_message` continues the last
        (assistant) message instead of answering (pass add_generation_prompt=False with it).
        """
        return _collect(self.chat_stream(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, tool_choice=tool_choice,
            chat_template_kwargs=chat_template_kwargs, continue_final_message=continue_final_message,
            timeout_s=timeout_s, model=model, request_id=request_id, **sampling))

    def chat_stream(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: ToolChoice = None,
                    chat_template_kwargs: Mapping[str, Any] | None = None, continue_final_message: bool = False,
                    timeout_s: float | None = None, model: str | None = None, request_id: str | None = None,
                    **sampling: Any) -> Iterator[Chunk]:
        """Like `chat`, yielding chunks as tokens are made (tool calls as `ToolCallDelta` pieces)."""
        req = generate_request(messages=messages, add_generation_prompt=add_generation_prompt, model=model,
                               request_id=request_id, tools=tools, tool_choice=tool_choice,
                               chat_template_kwargs=chat_template_kwargs,
                               continue_final_message=continue_final_message, **sampling)
        return self._stream(req, timeout_s)

    # -- other calls

    def tokenize(self, text: str | None = None, messages: Sequence[Mapping[str, Any]] | None = None, *,
                 add_special_tokens: bool = True, add_generation_prompt: bool = True,
                 tools: Sequence[Mapping[str, Any]] | None = None,
                 timeout_s: float | None = None, model: str | None = None) -> list[int]:
        """Token ids of `text` (BOS first when add_special_tokens) or of chat `messages`."""
        req = tokenize_request(text, messages, add_special_tokens, add_generation_prompt, model, tools)
        return list(self._unary(lambda stub: stub.Tokenize, req, timeout_s).token_ids)

    def list_models(self, *, timeout_s: float | None = None) -> list[ModelInfo]:
        """The models the mesh serves."""
        return model_infos(self._unary(lambda stub: stub.ListModels, gateway_pb2.ListModelsRequest(), timeout_s))

    # -- retries

    def _stream(self, req: gateway_pb2.GenerateRequest, timeout_s: float | None) -> Iterator[Chunk]:
        tries = StreamFailover(req, self.targets, self._rotation, self.retry_policy,
                               Deadline(self.timeout_s if timeout_s is None else timeout_s), self.max_resumes)
        while True:
            call = self._stubs[tries.target].Generate(tries.request(), timeout=tries.deadline.remaining_s(),
                                                      metadata=self._metadata)
            try:
                for resp in call:
                    tries.observe(resp)
                    yield chunk_from(resp)
                return
            except grpc.RpcError as err:
                outcome = tries.after(err)
                if isinstance(outcome, MeshError):
                    raise outcome from None
                log.info("gateway unavailable (%s); %s at %s in %.2f s", err.details(),
                         "resuming" if tries.token_ids else "retrying", self.targets[tries.target], outcome)
            finally:
                call.cancel()  # a no-op once the call ended; otherwise the caller left the loop early
            time.sleep(outcome)

    def _unary(self, method: Callable[[gateway_pb2_grpc.GatewayStub], Callable[..., T]], req: Any,
               timeout_s: float | None) -> T:
        deadline = Deadline(self.timeout_s if timeout_s is None else timeout_s)
        attempt, target = 0, self._rotation.take()
        while True:
            try:
                return method(self._stubs[target])(req, timeout=deadline.remaining_s(), metadata=self._metadata)
            except grpc.RpcError as err:
                delay = self.retry_policy.delay_s(err.code(), attempt, False, deadline)
                if delay is None:
                    raise from_rpc_error(err) from None
                target = self._rotation.take()
                log.info("gateway unavailable (%s); retry %d at %s in %.2f s", err.details(), attempt + 1,
                         self.targets[target], delay)
            time.sleep(delay)
            attempt += 1


def _collect(chunks: Iterator[Chunk]) -> Completion:
    builder = CompletionBuilder()
    for chunk in chunks:
        builder.add(chunk)
    return builder.build()
