"""Per-request sampling parameters, validated once at the edge of the engine."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

# Below this temperature a request is decoded greedily, as vLLM and SGLang do.
GREEDY_EPSILON = 1e-5
# Stop rules are checked at every step (and a stop string holds back that much streamed text), so their
# number and length are bounded: far above what anyone asks for, far below what would slow every step.
MAX_STOP_STRINGS = 128
MAX_STOP_STRING_CHARS = 4096
MAX_STOP_TOKEN_IDS = 4096
# A structured-output spec is compiled into a token automaton per request: bound what a client can make us build.
MAX_STRUCTURED_SPEC_CHARS = 256 * 1024
MAX_LOGIT_BIAS_TOKENS = 4096
STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "grammar", "structural_tag")


class InvalidParameter(ValueError):
    """A request parameter is out of range; the message names the parameter and the allowed range."""


@dataclass(frozen=True)
class StructuredOutput:
    """What a constrained request's output must match: `kind` one of STRUCTURED_KINDS, `spec` its text (a JSON
    Schema, a regular expression, an EBNF grammar or an xgrammar structural tag in JSON; empty for json_object).
    Checked here for shape only; the grammar engine (`moemesh.engine.grammar`) compiles it and names what it
    cannot."""

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        _check(self.kind in STRUCTURED_KINDS, "structured_output",
               f"kind must be one of {', '.join(STRUCTURED_KINDS)}, got {self.kind!r}")
        _check(len(self.spec) <= MAX_STRUCTURED_SPEC_CHARS, "structured_output",
               f"{self.kind} must be at most {MAX_STRUCTURED_SPEC_CHARS} characters, got {len(self.spec)}")
        if self.kind == "json_object":
            return
        _check(bool(self.spec.strip()), "structured_output", f"{self.kind} must not be empty")
        if self.kind in ("json_schema", "structural_tag"):
            try:
                value = json.loads(self.spec)
            except ValueError as e:
                raise InvalidParameter(f"structured_output {self.kind} is not valid JSON: {e}") from None
            _check(isinstance(value, (dict, bool)) if self.kind == "json_schema" else isinstance(value, dict),
                   "structured_output", f"{self.kind} must be a JSON object, got {type(value).__name__}")


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; field names and defaults follow vLLM's `SamplingParams`.

    `logprobs`: None returns no logprobs; 0 returns the chosen token's logprob; N > 0 also returns the
    N most likely tokens at each step. `prompt_logprobs`: the same for every prompt token after the first (each
    one's logprob given the tokens before it); such a request computes its whole prompt (no prefix-cache hit).
    Logprobs are those of the model's raw distribution (before temperature, penalties and truncation), as the
    OpenAI API reports them.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    structured_output: StructuredOutput | None = None
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen so the params stay hashable and immutable.
        object.__setattr__(self, "stop", tuple(self.stop))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in bias)))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        _check(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        _check(_finite(self.temperature) and self.temperature >= 0, "temperature",
               f"must be >= 0, got {self.temperature}")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k == -1 or self.top_k >= 0, "top_k",
               f"must be -1 or 0 (disabled) or a positive integer, got {self.top_k}")
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(_finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
               f"must be in [-2, 2], got {self.frequency_penalty}")
        _check(_finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty",
               f"must be in [-2, 2], got {self.presence_penalty}")
        _check(_finite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
               f"must be > 0, got {self.repetition_penalty}")
        _check(self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens}")
        _check(self.min_tokens <= self.max_tokens, "min_tokens",
               f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        _check(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs",
               f"must be between 0 and 20, got {self.logprobs}")
        _check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs",
               f"must be between 0 and 20, got {self.prompt_logprobs}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop",
               f"must hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        longest = max(map(len, self.stop), default=0)
        _check(longest <= MAX_STOP_STRING_CHARS, "stop",
               f"strings must be at most {MAX_STOP_STRING_CHARS} characters long, got one of {longest}")
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be non-negative token ids")
        _check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
               f"must hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}")
        _check(len(self.logit_bias) <= MAX_LOGIT_BIAS_TOKENS, "logit_bias",
               f"must hold at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(self.logit_bias)}")
        _check(all(t >= 0 for t, _ in self.logit_bias), "logit_bias", "keys must be non-negative token ids")
        _check(all(_finite(b) and -100 <= b <= 100 for _, b in self.logit_bias), "logit_bias",
               "values must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        """True when the request takes the most likely token at every step."""
        return self.temperature < GREEDY_EPSILON

    @property
    def has_penalties(self) -> bool:
        """True when any of the three repetition penalties changes the logits."""
        return self.frequency_penalty != 0 or self.presence_penalty != 0 or self.repetition_penalty != 1


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise InvalidParameter(f"{name} {message}")
