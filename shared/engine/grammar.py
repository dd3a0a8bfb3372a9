"""Structured output: a request's grammar as a token mask at every sampling step (xgrammar).

A spec (`StructuredOutput`: a JSON Schema, any JSON object, a regular expression or an EBNF grammar) compiles
once per distinct spec against the model's vocabulary; each request then walks its own matcher, which gives the
tokens allowed next as a bitmask and advances by every output token, sampled here or taken from elsewhere (a
prefill worker's first token, a migrated request's outputs). Compiling can take milliseconds to seconds for a
large schema: callers on an event loop compile in a worker thread first (`GrammarEngine.compile` caches), so the
engine thread only finds the compiled grammar and never stalls the other requests' steps.

xgrammar is an optional dependency (`pip install 'moemesh[structured]'`): it is imported on the first
constrained request, and without it such a request fails with InvalidParameter naming the package.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from moemesh.engine.sampling_params import InvalidParameter, StructuredOutput

if TYPE_CHECKING:
    from moemesh.model.tokenizer import Tokenizer

_MISSING = ("structured output needs the optional package xgrammar, which this worker cannot import "
            "(pip install 'moemesh[structured]')")


class GrammarState:
    """One request's position in its grammar."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def accept(self, token: int) -> bool:
        """Advance by `token`; False (and no move) when the grammar does not allow it here."""
        return bool(self._matcher.accept_token(int(token)))

    @property
    def terminated(self) -> bool:
        """The output is complete: the grammar accepted its end (a stop token)."""
        return bool(self._matcher.is_terminated())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of `bitmask` [B, ceil(V / 32)] int32."""
        self._matcher.fill_next_token_bitmask(bitmask, row)


class GrammarEngine:
    """Compiles specs for one tokenizer and vocabulary; safe to call from several threads."""

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_ids = list(stop_token_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutput) -> Any:
        """The compiled grammar of `spec` (cached by the compiler). InvalidParameter names what is wrong."""
        compiler = self._get_compiler()
        try:
            if spec.kind == "json_schema":
                return compiler.compile_json_schema(spec.spec, any_whitespace=False)
            if spec.kind == "json_object":  # an object, as OpenAI means it (the builtin grammar takes any value)
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.kind == "regex":
                return compiler.compile_regex(spec.spec)
            if spec.kind == "structural_tag":
                return compiler.compile_structural_tag(spec.spec)
            return compiler.compile_grammar(spec.spec)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's errors for a spec it cannot compile
            raise InvalidParameter(f"structured_output {spec.kind} could not be compiled: {_first_line(e)}") from None

    def state(self, spec: StructuredOutput) -> GrammarState:
        """A fresh matcher at the start of `spec`'s grammar."""
        import xgrammar

        return GrammarState(xgrammar.GrammarMatcher(self.compile(spec)))

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                if self._tokenizer is None:
                    raise InvalidParameter("structured output needs the model's tokenizer (tokenizer.json)")
                try:
                    import xgrammar
                    from transformers import PreTrainedTokenizerFast
                except ImportError:
                    raise InvalidParameter(_MISSING) from None
                hf = PreTrainedTokenizerFast(tokenizer_object=self._tokenizer.backend)
                info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=self._vocab_size,
                                                               stop_token_ids=self._stop_ids)
                # One thread: engines here run one intra-op thread each, and compiles are rare and cached.
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
            return self._compiler


def apply_grammar_masks(logits: torch.Tensor, states: Sequence[GrammarState | None]) -> None:
    """Set every token a row's grammar forbids next to -inf, in place. logits [B, V] float32; states [B]
    (None: the row is free)."""
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(len(states), logits.shape[1])  # [B, ceil(V / 32)] int32, CPU
    for i in rows:
        states[i].fill(bitmask, i)
    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)


# xgrammar prefixes its messages with a time and its C++ source location: not the client's business.
_LOCATION = re.compile(r"^\[[\d:.]+\]\s+\S+:\d+:\s*")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return _LOCATION.sub("", text.splitlines()[0]) if text else type(e).__name__
