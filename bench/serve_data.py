"""The prompts of `moemesh bench serve`: random ones of an exact token length, or a JSONL file.

Every prompt is counted with the benchmark's tokenizer (the served model's own, so that two servers
of the same model see the same token counts), as the server will see it: BOS included for text
prompts, the chat template included for chat requests.

Random prompts are random non-special tokens of the vocabulary decoded to text (so random words
with a word-level vocabulary), re-encoded and trimmed until the text encodes to exactly the length
asked for. Each prompt is drawn independently, so prompts share no prefix a cache could reuse.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moemesh.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class Prompt:
    prompt: str | list[int]  # text, or token ids (BOS included) for `--prompt-format ids`
    prompt_len: int  # tokens the server will see
    output_len: int  # max_tokens


class PromptMaker:
    """Counts and builds prompts with one tokenizer, for one endpoint."""

    def __init__(self, tokenizer: Tokenizer, chat: bool = False, ids: bool = False) -> None:
        if chat and ids:
            raise ValueError("token-id prompts need /v1/completions; chat takes text")
        self.tok = tokenizer
        self.chat = chat
        self.ids = ids
        special = {tokenizer.bos_token_id, *tokenizer.eos_token_ids}
        # Tokens that decode to something on their own, and are not special.
        self.pool = [i for i in range(tokenizer.vocab_size)
                     if i not in special and tokenizer.decode([i], skip_special_tokens=True)]
        if not self.pool:
            raise ValueError("the tokenizer has no ordinary tokens to make random prompts of")
        # Tokens the server adds around the text: BOS, or the chat template's.
        self.overhead = self.count("")

    def count(self, text: str) -> int:
        """Tokens the server sees for the text `text` (as the user message's content for chat)."""
        if self.chat:
            rendered = self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
            return len(self.tok.encode(rendered))
        return len(self.tok.encode(text))

    def count_output(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False))

    def make(self, text: str, output_len: int) -> Prompt:
        if self.ids:
            ids = self.tok.encode(text)
            return Prompt(ids, len(ids), output_len)
        return Prompt(text, self.count(text), output_len)

    def random_text(self, rng: random.Random, n_tokens: int) -> str:
        """A text of random tokens that encodes (without BOS) to exactly `n_tokens` where the
        tokenizer allows it (a few rounds of trimming and topping up; the result is counted anyway)."""
        ids = [rng.choice(self.pool) for _ in range(n_tokens)]
        text = self.tok.decode(ids)
        for _ in range(16):
            enc = self.tok.encode(text, add_special_tokens=False)
            if len(enc) == n_tokens:
                break
            if len(enc) > n_tokens:
                enc = enc[:n_tokens]
            else:
                enc = enc + [rng.choice(self.pool) for _ in range(n_tokens - len(enc))]
            text = self.tok.decode(enc)
        return text

    def random(self, n: int, input_len: int, output_len: int, seed: int, range_ratio: float = 0.0) -> list[Prompt]:
        """`n` random prompts of `input_len` tokens as the server sees them (BOS or template included).

        With `range_ratio` r > 0, lengths are drawn uniformly from [len * (1 - r), len * (1 + r)].
        """
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            in_len, out_len = input_len, output_len
            if range_ratio > 0:
                in_len = rng.randint(max(1, int(input_len * (1 - range_ratio))), int(input_len * (1 + range_ratio)))
                out_len = rng.randint(max(1, int(output_len * (1 - range_ratio))),
                                      max(1, int(output_len * (1 + range_ratio))))
            content = max(1, in_len - self.overhead)
            out.append(self.make(self.random_text(rng, content), out_len))
        return out

    def from_jsonl(self, path: str | Path, n: int, output_len: int) -> list[Prompt]:
        """`n` prompts from a JSONL file, in file order (cycling if it has fewer).

        Each line is an object with the prompt as `prompt` (a text), `messages` (OpenAI chat: the first
        user turn is taken) or `conversations` (ShareGPT: the first human turn); `output_len` or
        `max_tokens` gives its output length (default `output_len`).
        """
        records = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not JSON ({e})") from e
                text = _prompt_text(obj)
                if not text:
                    raise ValueError(f"{path}:{lineno}: no `prompt`, `messages` or `conversations` with text")
                out_len = obj.get("output_len", obj.get("max_tokens", output_len)) if isinstance(obj, dict) else None
                if not isinstance(out_len, int) or out_len < 1:
                    raise ValueError(f"{path}:{lineno}: output_len must be a positive integer, got {out_len!r}")
                records.append((text, out_len))
        if not records:
            raise ValueError(f"{path}: no prompts")
        return [self.make(*records[i % len(records)]) for i in range(n)]


def _prompt_text(obj: Any) -> str:
    if not isinstance(obj, dict):
        return ""
    if isinstance(obj.get("prompt"), str):
        return obj["prompt"]
    for key, role_key, text_key, roles in (("messages", "role", "content", ("user",)),
                                           ("conversations", "from", "value", ("human", "user"))):
        for turn in obj.get(key) or []:
            if isinstance(turn, dict) and turn.get(role_key) in roles and isinstance(turn.get(text_key), str):
                return turn[text_key]
    return ""
