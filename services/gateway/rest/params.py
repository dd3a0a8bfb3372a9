"""OpenAI request bodies -> the core's `GenerateRequest`s: one per choice, sampling params filled in.

A body with n choices (and, for completions, several prompts) becomes n requests per prompt; with a
seed, choice i samples with seed + i. The core validates ranges again (and says which parameter);
what only the REST API has (echo, best_of...) is checked here; chat messages, tools and tool_choice are
checked by the core (moemesh.services.gateway.chat_input), for gRPC clients too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from moemesh.services.gateway.rest.errors import ApiError
from moemesh.services.gateway.rest.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    ChatTool,
    CompletionRequest,
    NamedToolChoice,
    _Sampling,
)
from moemesh.services.gateway.rest.structured import structured_output
from moemesh.v1 import common_pb2, gateway_pb2

_TOOL_CHOICES = {"auto": gateway_pb2.TOOL_CHOICE_AUTO, "none": gateway_pb2.TOOL_CHOICE_NONE,
                 "required": gateway_pb2.TOOL_CHOICE_REQUIRED}

_SEED_MOD = 2**64  # the wire's seed is a uint64: negative (int64) seeds wrap around
_FLOAT32_TINY = 1.401298464324817e-45  # the smallest positive float32 (a subnormal)
MAX_CHOICES = 1024  # prompts times n, per call


def sampling(body: _Sampling, max_tokens: int | None, logprobs: int | None, choice: int) -> common_pb2.SamplingParams:
    """The sampling params of choice `choice` of `body`; unset optional fields stay unset (defaults apply)."""
    pb = common_pb2.SamplingParams(
        max_tokens=max_tokens or 0, top_k=max(body.top_k or 0, 0), min_p=_float32(body.min_p or 0.0),
        frequency_penalty=body.frequency_penalty or 0.0, presence_penalty=body.presence_penalty or 0.0,
        stop=stop_strings(body.stop), stop_token_ids=body.stop_token_ids or [], ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens, include_stop_str_in_output=body.include_stop_str_in_output)
    if body.temperature is not None:
        pb.temperature = _float32(body.temperature)
    if body.top_p is not None:
        pb.top_p = _float32(body.top_p)
    if body.repetition_penalty is not None:
        pb.repetition_penalty = _float32(body.repetition_penalty)
    if body.seed is not None:
        pb.seed = (body.seed + choice) % _SEED_MOD
    if logprobs is not None:
        pb.logprobs = logprobs
    if (constraint := structured_output(body)) is not None:
        pb.structured_output.CopyFrom(constraint)
    if not body.skip_special_tokens:
        pb.skip_special_tokens = False
    for key, bias in (body.logit_bias or {}).items():
        if not key.isdigit() or int(key) > 2**32 - 1:
            raise ApiError(400, f"logit_bias keys must be token ids, got {key[:32]!r}", "logit_bias")
        pb.logit_bias[int(key)] = bias
    return pb


def _float32(x: float) -> float:
    """`x` as the wire's float32 keeps its meaning: a positive value too small for float32 stays positive
    (top_p=1e-300 is a nucleus of one token, not an invalid 0)."""
    return _FLOAT32_TINY if 0 < x < _FLOAT32_TINY else x


def stop_strings(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def check_common(body: _Sampling) -> None:
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")


def completion_prompts(body: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completions body: one text or token list, or a batch of them."""
    p = body.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise ApiError(400, "prompt must not be empty", "prompt")
    if isinstance(p[0], int):
        return [list(p)]  # one prompt as token ids
    return list(p)


def completion_requests(body: CompletionRequest, base_id: str) -> list[gateway_pb2.GenerateRequest]:
    """One request per (prompt, choice), prompt-major: request k is prompt k // n, choice k % n."""
    check_common(body)
    if body.suffix:
        raise ApiError(400, "suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError(400, f"best_of must equal n ({body.n}) or be null: best-of selection is not supported",
                       "best_of")
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(400, "max_tokens 0 is for scoring a prompt: it needs echo (with logprobs)", "max_tokens")
    prompts = completion_prompts(body)
    if len(prompts) * body.n > MAX_CHOICES:
        raise ApiError(400, f"{len(prompts)} prompts times n={body.n} exceeds {MAX_CHOICES} choices per call",
                       "prompt")
    out = []
    for p, prompt in enumerate(prompts):
        for i in range(body.n):
            req = gateway_pb2.GenerateRequest(model=body.model or "", request_id=f"{base_id}-{p * body.n + i}",
                                              sampling=sampling(body, 1 if body.max_tokens == 0 else body.max_tokens,
                                                                body.logprobs, i))
            if body.echo and body.logprobs is not None:  # the echoed prompt's logprobs too
                req.sampling.prompt_logprobs = body.logprobs
            if isinstance(prompt, str):
                req.prompt = prompt
            else:
                req.token_ids.ids.extend(prompt)
            out.append(req)
    return out


def chat_messages(body: ChatCompletionRequest) -> gateway_pb2.ChatMessages:
    """The body's conversation, tools and template options as the core's ChatMessages."""
    chat = gateway_pb2.ChatMessages(messages=chat_turns(body.messages),
                                    add_generation_prompt=body.add_generation_prompt, tools=chat_tools(body.tools),
                                    continue_final_message=body.continue_final_message)
    if body.parallel_tool_calls is not None:
        chat.parallel_tool_calls = body.parallel_tool_calls
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        chat.tool_choice = gateway_pb2.TOOL_CHOICE_FUNCTION
        chat.tool_choice_function = choice.function.name
    elif choice is not None:
        chat.tool_choice = _TOOL_CHOICES[choice]
    if body.chat_template_kwargs:
        chat.chat_template_kwargs_json = json.dumps(body.chat_template_kwargs)
    return chat


def chat_turns(messages: Sequence[ChatMessage]) -> list[gateway_pb2.ChatMessage]:
    """Messages as the core's ChatMessage list: text content, tool calls, the tool turns' call ids."""
    turns = []
    for i, m in enumerate(messages):
        turn = gateway_pb2.ChatMessage(role=m.role, content=message_content(m, i), name=m.name or "",
                                       tool_call_id=m.tool_call_id or "")
        for call in m.tool_calls or ():
            turn.tool_calls.add(id=call.id, name=call.function.name, arguments=call.function.arguments)
        turns.append(turn)
    return turns


def chat_tools(tools: Sequence[ChatTool] | None) -> list[gateway_pb2.Tool]:
    return [gateway_pb2.Tool(name=t.function.name, description=t.function.description or "",
                             parameters_json=json.dumps(t.function.parameters) if t.function.parameters else "")
            for t in tools or ()]


def message_content(message: ChatMessage, i: int) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    if content is None:
        if message.role == "assistant":
            return ""
        raise ApiError(400, f"messages[{i}].content is required for role {message.role}", f"messages.{i}.content")
    texts = []
    for j, part in enumerate(content):
        where = f"messages.{i}.content.{j}"
        if part.type != "text":
            raise ApiError(400, f"messages[{i}].content[{j}] is a {part.type!r} part; only text parts are supported",
                           where)
        if part.text is None:
            raise ApiError(400, f"messages[{i}].content[{j}] is a text part without text", where)
        texts.append(part.text)
    return "\n".join(texts)


def chat_requests(body: ChatCompletionRequest, base_id: str) -> list[gateway_pb2.GenerateRequest]:
    """One request per choice; max tokens default to what the context leaves after the prompt."""
    check_common(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    # Unset: the core gives a chat request what the context has left after its prompt.
    max_tokens = body.max_completion_tokens or body.max_tokens
    messages = chat_messages(body)
    return [gateway_pb2.GenerateRequest(model=body.model or "", request_id=f"{base_id}-{i}", messages=messages,
                                        sampling=sampling(body, max_tokens, logprobs, i))
            for i in range(body.n)]
