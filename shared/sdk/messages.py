"""Between the SDK's Python values and the gateway's protobuf messages (shared by both clients)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc

from moemesh.sdk.chat import ToolChoice, chat_messages
from moemesh.sdk.errors import InvalidArgumentError, error_for
from moemesh.sdk.results import Chunk, Completion, ModelInfo, ToolCall, ToolCallDelta, Usage
from moemesh.v1 import common_pb2, gateway_pb2

_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
    common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}


def sampling_message(
    *,
    max_tokens: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    min_p: float = 0.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    ignore_eos: bool = False,
    min_tokens: int = 0,
    logprobs: int | None = None,
    include_stop_str_in_output: bool = False,
    json_schema: Mapping[str, Any] | str | None = None,
    json_object: bool = False,
    regex: str | None = None,
    grammar: str | None = None,
    logit_bias: Mapping[int, float] | None = None,
    skip_special_tokens: bool = True,
    prompt_logprobs: int | None = None,
) -> common_pb2.SamplingParams:
    """The sampling options every generate/stream/chat call takes (vLLM's names and defaults).

    Structured output, at most one of: `json_schema` (a JSON Schema, as a dict or JSON text), `json_object`
    (any JSON object), `regex`, `grammar` (EBNF): the output is constrained token by token to match.
    `logit_bias`: token id -> a value in [-100, 100] added to its logit before sampling.
    `skip_special_tokens=False` keeps special tokens (BOS, EOS) in the text. `prompt_logprobs=N`: each prompt
    token's logprob given the ones before it (and N alternatives), in the first chunk and the Completion.
    The gateway validates the values; this only checks what the wire format cannot carry.
    """
    if max_tokens < 1:
        raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, f"max_tokens must be >= 1, got {max_tokens}")
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    fields: dict[str, Any] = {
        "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
        "frequency_penalty": frequency_penalty, "presence_penalty": presence_penalty,
        "repetition_penalty": repetition_penalty, "stop": stops, "stop_token_ids": list(stop_token_ids or ()),
        "ignore_eos": ignore_eos, "min_tokens": min_tokens,
        "include_stop_str_in_output": include_stop_str_in_output,
    }
    if seed is not None:
        fields["seed"] = seed
    if logprobs is not None:
        fields["logprobs"] = logprobs
    msg = common_pb2.SamplingParams()
    constraint = _structured(json_schema, json_object, regex, grammar)
    if constraint is not None:
        msg.structured_output.CopyFrom(constraint)
    if not skip_special_tokens:
        msg.skip_special_tokens = False
    try:
        if prompt_logprobs is not None:
            msg.prompt_logprobs = prompt_logprobs
        for token, bias in (logit_bias or {}).items():
            msg.logit_bias[token] = bias
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, f"logit_bias or prompt_logprobs: {exc}") from None
    for name, value in fields.items():
        try:
            if isinstance(value, list):
                getattr(msg, name).extend(value)
            else:
                setattr(msg, name, value)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, f"{name}={value!r}: {exc}") from None
    return msg


def _structured(json_schema: Mapping[str, Any] | str | None, json_object: bool, regex: str | None,
                grammar: str | None) -> common_pb2.StructuredOutput | None:
    given = [name for name, v in (("json_schema", json_schema), ("json_object", json_object or None),
                                  ("regex", regex), ("grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT,
                                   "pass at most one of json_schema, json_object, regex, grammar "
                                   f"(got {', '.join(given)})")
    if json_schema is not None:
        return common_pb2.StructuredOutput(
            json_schema=json_schema if isinstance(json_schema, str) else json.dumps(json_schema))
    if json_object:
        return common_pb2.StructuredOutput(json_object=True)
    if regex is not None:
        return common_pb2.StructuredOutput(regex=regex)
    if grammar is not None:
        return common_pb2.StructuredOutput(grammar=grammar)
    return None


def generate_request(
    prompt: str | None = None,
    token_ids: Sequence[int] | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = True,
    model: str | None = None,
    request_id: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: ToolChoice = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    continue_final_message: bool = False,
    **sampling: Any,
) -> gateway_pb2.GenerateRequest:
    """A GenerateRequest with exactly one of `prompt`, `token_ids`, `messages` (`tools` and the chat options
    with `messages` only).

    `sampling` are the keyword arguments of `sampling_message`; an unknown one raises TypeError.
    """
    given = [name for name, v in (("prompt", prompt), ("token_ids", token_ids), ("messages", messages))
             if v is not None]
    if len(given) != 1:
        raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT,
                                   "pass exactly one of prompt, token_ids or messages"
                                   + (f" (got {', '.join(given)})" if given else ""))
    req = gateway_pb2.GenerateRequest(model=model or "", request_id=request_id or "",
                                      sampling=sampling_message(**sampling))
    if prompt is not None:
        req.prompt = prompt
    elif token_ids is not None:
        try:
            req.token_ids.ids.extend(token_ids)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, f"token_ids: {exc}") from None
    else:
        req.messages.CopyFrom(chat_messages(messages or (), add_generation_prompt, tools=tools,
                                            tool_choice=tool_choice, chat_template_kwargs=chat_template_kwargs,
                                            continue_final_message=continue_final_message))
    return req


def chunk_from(resp: gateway_pb2.GenerateResponse) -> Chunk:
    """A stream message as a Chunk."""
    has_logprobs = len(resp.logprobs) > 0
    stop_field = resp.WhichOneof("stop_reason")
    return Chunk(
        request_id=resp.request_id, text=resp.text, token_ids=list(resp.token_ids),
        logprobs=[s.logprob for s in resp.logprobs] if has_logprobs else None,
        top_logprobs=[[(t.token_id, t.logprob) for t in s.top] for s in resp.logprobs] if has_logprobs else None,
        finish_reason=_FINISH.get(resp.finish_reason),
        stop_reason=getattr(resp, stop_field) if stop_field else None,
        usage=Usage(resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.cached_prompt_tokens)
        if resp.HasField("usage") else None,
        reasoning_text=resp.reasoning_text,
        tool_calls=[ToolCallDelta(d.index, d.id or None, d.name or None, d.arguments) for d in resp.tool_calls],
        prompt_logprobs=[(s.logprob, [(t.token_id, t.logprob) for t in s.top]) for s in resp.prompt_logprobs]
        if resp.prompt_logprobs else None)


class CompletionBuilder:
    """Folds a stream's chunks into a Completion."""

    def __init__(self) -> None:
        self._chunks: list[Chunk] = []

    def add(self, chunk: Chunk) -> None:
        self._chunks.append(chunk)

    def build(self) -> Completion:
        """The Completion; raises a MeshError when the stream ended without a finish reason."""
        last = self._chunks[-1] if self._chunks else None
        if last is None or last.finish_reason is None:
            raise error_for(grpc.StatusCode.INTERNAL, "the stream ended before the request finished")
        with_logprobs = any(c.logprobs is not None for c in self._chunks)
        return Completion(
            request_id=last.request_id, text="".join(c.text for c in self._chunks),
            token_ids=[t for c in self._chunks for t in c.token_ids], finish_reason=last.finish_reason,
            logprobs=[lp for c in self._chunks for lp in (c.logprobs or ())] if with_logprobs else None,
            top_logprobs=[t for c in self._chunks for t in (c.top_logprobs or ())] if with_logprobs else None,
            stop_reason=last.stop_reason, usage=last.usage,
            reasoning_text="".join(c.reasoning_text for c in self._chunks),
            tool_calls=tool_calls(d for c in self._chunks for d in c.tool_calls),
            prompt_logprobs=next((c.prompt_logprobs for c in self._chunks if c.prompt_logprobs is not None), None))


def tool_calls(deltas: Iterable[ToolCallDelta]) -> list[ToolCall]:
    """Tool-call pieces joined as an OpenAI client joins them: by index, argument fragments appended."""
    calls: dict[int, ToolCall] = {}
    for d in deltas:
        call = calls.setdefault(d.index, ToolCall(id="", name=""))
        calls[d.index] = ToolCall(id=d.id or call.id, name=d.name or call.name, arguments=call.arguments + d.arguments)
    return [calls[i] for i in sorted(calls)]


def model_infos(resp: gateway_pb2.ListModelsResponse) -> list[ModelInfo]:
    return [ModelInfo(m.id, m.max_model_len, m.num_prefill_workers, m.num_decode_workers) for m in resp.models]


def tokenize_request(text: str | None, messages: Sequence[Mapping[str, Any]] | None, add_special_tokens: bool,
                     add_generation_prompt: bool, model: str | None,
                     tools: Sequence[Mapping[str, Any]] | None = None) -> gateway_pb2.TokenizeRequest:
    """A TokenizeRequest with exactly one of `text`, `messages`."""
    if (text is None) == (messages is None):
        raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, "pass exactly one of text or messages")
    req = gateway_pb2.TokenizeRequest(model=model or "", add_special_tokens=add_special_tokens)
    if text is not None:
        req.text = text
    else:
        req.messages.CopyFrom(chat_messages(messages or (), add_generation_prompt, tools=tools))
    return req
