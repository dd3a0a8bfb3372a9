"""The REST facade's bodies: OpenAI's request and response shapes (with vLLM's extras), as pydantic models.

Requests accept unknown fields (clients send many we do not use; the handlers log each name once) and
check every field's type and range here, so a bad value is a 400 naming the field before anything is
tokenized. Scalars are strict: "5" is not a number and `true` is not 1. The responses are what the
handlers return and what the OpenAPI document shows.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from moemesh.engine.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from moemesh.services.gateway.chat_input import MAX_ROLE_CHARS

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
TokenId = Annotated[int, Strict(), Field(ge=0, le=2**32 - 1)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
# A prompt is never empty: a text has a character, token ids an id, a batch a prompt.
PromptText = Annotated[str, Field(min_length=1)]
PromptIds = Annotated[list[TokenId], Field(min_length=1)]

MAX_N = 128  # choices per prompt
MAX_LOGPROBS = 20  # top alternatives per token, as the workers allow
UINT32_MAX = 2**32 - 1
INT32_MAX = 2**31 - 1
# Sampling floats travel as float32: larger values would arrive as infinity.
FLOAT32_MAX = 3.4028234663852886e38


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: Bool = Field(False, description="Send one more chunk before `[DONE]` with the usage of "
                                                   "the whole request and no choices; every other chunk "
                                                   "then carries `usage: null`.")


class _Sampling(_Request):
    """The fields completions and chat share: the model, the fan-out, streaming and sampling."""

    model: str | None = Field(None, description="The served model's id (see GET /v1/models); "
                                                "null or empty uses the one this mesh serves.")
    n: Int = Field(1, ge=1, le=MAX_N, description="Choices to generate for each prompt. With a `seed`, choice i "
                                                  "samples with seed + i, so choices differ reproducibly.")
    stream: Bool = Field(False, description="Stream chunks as Server-Sent Events, ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = Field(None, description="Only with `stream: true`.")
    temperature: Float | None = Field(None, ge=0, le=FLOAT32_MAX, description="0 is greedy; default 1.0.")
    top_p: Float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass; default 1.0.")
    top_k: Int | None = Field(None, ge=-1, le=INT32_MAX,
                              description="vLLM extra: keep the k most likely tokens; -1 or 0 disables.")
    min_p: Float | None = Field(None, ge=0, le=1, description="vLLM extra: drop tokens less likely than "
                                                              "min_p times the most likely one.")
    frequency_penalty: Float | None = Field(None, ge=-2, le=2,
                                            description="Subtracted once per occurrence of a token in the output.")
    presence_penalty: Float | None = Field(None, ge=-2, le=2,
                                           description="Subtracted once if a token occurred in the output.")
    repetition_penalty: Float | None = Field(None, gt=0, le=FLOAT32_MAX,
                                             description="vLLM extra: multiplicative penalty on tokens seen in "
                                                         "prompt or output; 1 is none.")
    seed: Int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="Makes sampling reproducible.")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        None, description="Strings that end generation (cut from the text).")
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = Field(
        None, description="vLLM extra: token ids that end generation.")
    ignore_eos: Bool = Field(False, description="vLLM extra: keep generating past EOS.")
    min_tokens: Int = Field(0, ge=0, le=UINT32_MAX, description="vLLM extra: tokens to generate before EOS or a "
                                                                "stop token id may end the choice.")
    include_stop_str_in_output: Bool = Field(False, description="vLLM extra: keep a matched stop string.")
    max_tokens: Int | None = Field(None, ge=1, le=UINT32_MAX, description="Tokens to generate at most.")
    user: str | None = Field(None, description="Accepted for compatibility; unused.")
    skip_special_tokens: Bool = Field(True, description="vLLM extra: leave special tokens (BOS, EOS) out of the "
                                                        "text; false keeps them.")
    logit_bias: dict[str, Float] | None = Field(
        None, description="Added to the logits of the given token ids (keys: ids as strings) before sampling, each "
                          "in [-100, 100].")
    response_format: dict[str, Any] | None = Field(
        None, description="`{\"type\": \"text\"}` (free), `{\"type\": \"json_object\"}` (any JSON object) or "
                          "`{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}`: "
                          "the output is constrained token by token to match (structured output; the workers need "
                          "xgrammar).")
    structured_outputs: dict[str, Any] | None = Field(
        None, description="vLLM extra: exactly one of `json` (a JSON Schema), `json_object` (true), `regex` or "
                          "`grammar` (EBNF) constrains the output; not together with a non-text response_format.")


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "The mesh is", "max_tokens": 16, "temperature": 0},
        {"prompt": ["Once upon a time", [1, 2, 3]], "n": 2, "seed": 7, "max_tokens": 8, "logprobs": 2, "stream": True,
         "stream_options": {"include_usage": True}, "stop": ["\n"]},
    ]})

    prompt: (PromptText | PromptIds | Annotated[list[PromptText], Field(min_length=1)]
             | Annotated[list[PromptIds], Field(min_length=1)]) = Field(
        description="A text, a list of token ids, or a batch of either (one set of choices per prompt).")
    max_tokens: Int | None = Field(16, ge=0, le=UINT32_MAX, description="Tokens to generate at most (default 16); "
                                                                      "0 only with echo: the prompt is scored, "
                                                                      "nothing generated.")
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Return each token's logprob and this "
                                                                           "many most likely alternatives.")
    echo: Bool = Field(False, description="Put the prompt's text before the completion's.")
    best_of: Int | None = Field(None, ge=1, le=MAX_N, description="Only null or equal to n is supported.")
    suffix: str | None = Field(None, description="Not supported: must be null.")

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_of_the_prompt_forms(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # The union's own error lists every form it tried, element by element; one sentence says what fits.
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("must be a non-empty text, a non-empty list of token ids (integers in [0, 2**32)), "
                             "or a non-empty list of either") from None


class TextPart(BaseModel):
    """One part of a message's content; only text parts are served."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(description="Only `text` is supported.")
    text: str | None = None


class FunctionCall(_Request):
    name: str = Field(description="The function called.")
    arguments: str = Field("", description="Its arguments, a JSON object in text, as the model wrote it.")


class MessageToolCall(_Request):
    id: str = Field("", description="The call's id; the tool message with its result names it in tool_call_id.")
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: str = Field(min_length=1, max_length=MAX_ROLE_CHARS,
                      description="system, user, assistant, tool (or whatever the chat template knows).")
    content: str | list[TextPart] | None = Field(None, description="A text or a list of text parts (joined "
                                                                   "with newlines); null only for assistant turns.")
    name: str | None = Field(None, description="A tool turn: the function's name (for templates that show it).")
    tool_calls: list[MessageToolCall] | None = Field(None, description="An assistant turn: the tools it called.")
    tool_call_id: str | None = Field(None, description="A tool turn: the id of the call whose result it holds.")


class FunctionDefinition(_Request):
    name: str = Field(description="The function's name: 1 to 64 letters, digits, '_', '-' or '.'.")
    description: str | None = Field(None, description="What it does, shown to the model.")
    parameters: dict[str, Any] | None = Field(None, description="Its parameters as a JSON Schema object.")
    strict: Bool | None = Field(None, description="Accepted; decoding is not constrained to the schema yet.")


class ChatTool(_Request):
    type: Literal["function"] = Field(description="Only function tools exist.")
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"messages": [{"role": "user", "content": "Hi!"}], "max_completion_tokens": 16},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
         "max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "seed": 1, "logprobs": True, "top_logprobs": 2,
         "stream": True},
    ]})

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation, oldest turn first.")
    max_completion_tokens: Int | None = Field(None, ge=1, le=UINT32_MAX,
                                              description="Tokens to generate at most; wins over max_tokens. "
                                                          "Default: up to the model's context limit.")
    logprobs: Bool = Field(False, description="Return the logprob of each output token.")
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description="With logprobs: also the most likely alternatives per token.")
    add_generation_prompt: Bool = Field(True, description="vLLM extra: open the assistant's turn in the template.")
    tools: list[ChatTool] | None = Field(None, description="Functions the model may call (the chat template shows "
                                                           "them to the model).")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="`auto` (the default with tools): the model decides, its calls come back in "
                          "`message.tool_calls`; `none`: calls are not parsed; `required` or a named function: "
                          "parsed like `auto` (decoding is not constrained to the tools' schemas yet).")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="vLLM extra: more variables for the chat template (e.g. `{\"thinking\": true}` for "
                          "DeepSeek-V3.1).")
    parallel_tool_calls: Bool | None = Field(None, description="With tool_choice required: false forces exactly one "
                                                               "call; default true (one or more).")
    continue_final_message: Bool = Field(False, description="vLLM extra: continue the last (assistant) message "
                                                            "instead of answering it; needs add_generation_prompt "
                                                            "false.")


# -- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose KV came from a prefix cache.")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Prompt tokens (chat template tokens included), once per prompt.")
    completion_tokens: int = Field(description="Tokens generated, all choices together.")
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


FinishReason = Literal["stop", "length", "abort", "tool_calls"]
StopReason = int | str | None
_FINISH = "Why the choice ended: `stop` (EOS, a stop string or token id), `length` (max tokens or the " \
          "context limit), `tool_calls` (chat: the model called tools, then stopped); null until it ends."
_STOP = "vLLM extra: the stop token id or stop string that ended the choice; null for EOS or length."


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for the first prompt token of an echo")
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int] = Field(description="Where each token starts in the choice's text.")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = Field(description=_FINISH)
    stop_reason: StopReason = Field(None, description=_STOP)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="A JSON object in text, as the model wrote it (check it before use).")


class ChatToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = Field(None, description="DeepSeek's field: the model's thinking (with a "
                                                            "reasoning parser), kept out of content.")
    tool_calls: list[ChatToolCall] = Field(default_factory=list, description="The tools the model called.")


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReason | None = Field(description=_FINISH)
    stop_reason: StopReason = Field(None, description=_STOP)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A piece of a streamed tool call: `id`, `type` and `function.name` on its first piece, then
    `function.arguments` fragments (join those of one `index`)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReason | None = Field(None, description=_FINISH)
    stop_reason: StopReason = Field(None, description=_STOP)


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    """One `data:` event of a streamed completion (choices carry text deltas)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moemesh"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = Field(None, description="vLLM extra: the context limit in tokens.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, whatever its status."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "unavailable", "draining"] = Field(
        description="ok (200); unavailable: no decode worker (503); draining: the gateway is shutting down (503).")
    decode_workers: int = Field(description="Decode workers registered and ready.")
    prefill_workers: int = Field(description="Prefill workers registered (0: decode workers prefill).")


class TokenizeRequest(_Request):
    """POST /tokenize (vLLM's): a text, or chat messages rendered with the chat template."""

    model: str | None = Field(None, description="The served model's id; default: the served one.")
    prompt: str | None = Field(None, description="A text to tokenize (give this or `messages`).")
    messages: list[ChatMessage] | None = Field(None, description="Chat messages to render and tokenize.")
    tools: list[ChatTool] | None = Field(None, description="With `messages`: tools, rendered as for a chat call.")
    add_special_tokens: Bool = Field(True, description="Add BOS to a text (a chat template adds its own).")
    add_generation_prompt: Bool = Field(True, description="With `messages`: end with the assistant's turn opening.")


class TokenizeResponse(BaseModel):
    count: int = Field(description="How many tokens.")
    max_model_len: int = Field(description="The model's context limit in tokens, prompt and output together.")
    tokens: list[int] = Field(description="The token ids.")


class DetokenizeRequest(_Request):
    """POST /detokenize (vLLM's)."""

    model: str | None = Field(None, description="The served model's id; default: the served one.")
    tokens: list[TokenId] = Field(description="Token ids to turn back into text.")


class DetokenizeResponse(BaseModel):
    prompt: str = Field(description="The text of the tokens (special tokens included).")


class VersionResponse(BaseModel):
    version: str = Field(description="moemesh's version.")
