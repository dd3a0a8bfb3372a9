"""A Generate request's inputs, checked and turned into what workers take: token ids and sampling.

Every check raises a `ServiceError` (INVALID_ARGUMENT or NOT_FOUND) with a message for the user, so
the REST facade and the gRPC servicer report the same errors.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from moemesh.engine.sampling_params import InvalidParameter, SamplingParams
from moemesh.model.tokenizer import Tokenizer
from moemesh.service.convert import sampling_from_pb
from moemesh.service.errors import InvalidArgument, NotFound
from moemesh.services.gateway.chat_input import ChatRenderer, tools_requested
from moemesh.services.gateway.tool_grammar import FORCED, forced_tool_calls
from moemesh.v1 import common_pb2, gateway_pb2

# Client-chosen ids travel to every worker and into logs and errors: bounded, so no status message
# that echoes one becomes too long for a gRPC client to read (past 8 KiB it sees RESOURCE_EXHAUSTED).
MAX_REQUEST_ID_CHARS = 256


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request: its id, prompt token ids and sampling (proto form, defaults filled in);
    `chat`: it came as chat messages (its output may be parsed); `tools`: its tool calls are to be parsed."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: common_pb2.SamplingParams
    params: SamplingParams
    chat: bool = False
    tools: bool = False
    # A resumed stream (its gateway went away): the tokens its client has, and where it stands in the model's text.
    resume_token_ids: list[int] = field(default_factory=list)
    resume_text_offset: int = 0


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """The engine's SamplingParams for a wire message; InvalidArgument names the bad parameter."""
    try:
        return sampling_from_pb(msg)
    except InvalidParameter as exc:
        raise InvalidArgument(str(exc)) from None


def shown(text: str, max_chars: int = 64) -> str:
    """`text` quoted for an error message, cut when long (the client sent it; it need not read it back whole)."""
    if len(text) <= max_chars:
        return repr(text)
    return f"{text[:max_chars]!r}... ({len(text)} characters)"


def check_model(requested: str, served: str) -> None:
    """NOT_FOUND unless `requested` is empty or the served model's name."""
    if requested and requested != served:
        raise NotFound(f"model {shown(requested)} is not served here; this mesh serves {served!r}")


def check_request_id(request_id: str) -> None:
    """INVALID_ARGUMENT for a client's request id too long to carry around."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(f"request_id is {len(request_id)} characters long; at most {MAX_REQUEST_ID_CHARS} "
                              "are allowed")


def prompt_token_ids(req: gateway_pb2.GenerateRequest, tokenizer: Tokenizer, renderer: ChatRenderer) -> list[int]:
    """The prompt of `req` as token ids: text gets BOS, chat messages their template, ids are checked."""
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidArgument("the request needs a prompt: set one of prompt, token_ids or messages")
    if which == "prompt":
        if not req.prompt:
            raise InvalidArgument("prompt must not be empty")
        return tokenizer.encode(req.prompt, add_special_tokens=True)
    if which == "messages":
        return renderer.render(req.messages)
    ids = list(req.token_ids.ids)
    if not ids:
        raise InvalidArgument("token_ids must not be empty")
    check_token_ids(ids, tokenizer.vocab_size)
    return ids


def check_token_ids(ids: Sequence[int], vocab_size: int, name: str = "token_ids") -> None:
    """INVALID_ARGUMENT naming the first id outside the vocabulary (as field `name`'s element)."""
    for i, t in enumerate(ids):
        if t >= vocab_size:
            raise InvalidArgument(f"{name}[{i}] = {t} is outside the vocabulary (size {vocab_size})")


def prepare(req: gateway_pb2.GenerateRequest, renderer: ChatRenderer, model_name: str,
            max_model_len: int) -> PreparedRequest:
    """Validate `req`, tokenize its prompt and give it an id (the client's, or a new one).

    max_tokens unset (0): a chat request may use the rest of the context (as OpenAI's chat API), any other
    SamplingParams' default (16). Prompt plus max_tokens beyond the context is refused, as vLLM does.
    """
    check_model(req.model, model_name)
    check_request_id(req.request_id)
    chat = req.WhichOneof("input") == "messages"
    ids = prompt_token_ids(req, renderer.tokenizer, renderer)
    if not ids:
        raise InvalidArgument("the prompt has no tokens")
    if len(ids) >= max_model_len:
        raise InvalidArgument(
            f"the prompt has {len(ids)} tokens; this model's context limit is {max_model_len} tokens, "
            "prompt and output together, so the prompt must be shorter")
    sampling = common_pb2.SamplingParams()
    sampling.CopyFrom(req.sampling)
    if chat and not sampling.max_tokens:
        sampling.max_tokens = max_model_len - len(ids)
    if chat and req.messages.tools and req.messages.tool_choice in FORCED:
        if sampling.structured_output.WhichOneof("kind") is not None:
            raise InvalidArgument("tool_choice required or a named function constrains the output to tool calls "
                                  "itself: send it without response_format or structured_outputs")
        sampling.structured_output.CopyFrom(
            forced_tool_calls(req.messages, renderer.tool_parser or "", renderer.tokenizer))
    params = sampling_from_proto(sampling)
    if len(ids) + params.max_tokens > max_model_len:
        raise InvalidArgument(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{len(ids) + params.max_tokens} tokens ({len(ids)} in the {'messages' if chat else 'prompt'}, "
            f"{params.max_tokens} in the completion). Please reduce the length of the "
            f"{'messages' if chat else 'prompt'} or completion.")
    sampling.max_tokens = params.max_tokens
    resume = list(req.resume_token_ids)
    check_resume(resume, req.resume_text_offset, params.max_tokens, renderer.tokenizer.vocab_size)
    return PreparedRequest(request_id=req.request_id or uuid.uuid4().hex, prompt_token_ids=ids,
                           sampling=sampling, params=params, chat=chat,
                           tools=chat and tools_requested(req.messages), resume_token_ids=resume,
                           resume_text_offset=req.resume_text_offset)


def check_resume(token_ids: Sequence[int], text_offset: int, max_tokens: int, vocab_size: int) -> None:
    """INVALID_ARGUMENT for resume fields no broken stream could have left."""
    if text_offset and not token_ids:
        raise InvalidArgument("resume_text_offset is set but resume_token_ids is empty: a stream's text comes "
                              "with its tokens")
    if len(token_ids) >= max_tokens:
        raise InvalidArgument(f"resume_token_ids holds {len(token_ids)} tokens and max_tokens is {max_tokens}: "
                              "nothing is left to generate")
    check_token_ids(token_ids, vocab_size, "resume_token_ids")
