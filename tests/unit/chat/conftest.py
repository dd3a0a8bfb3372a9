"""Tokenizers for the chat parser tests, built once per module run.

- `chat_tok`: the tiny tokenizer with DeepSeek's chat tokens (`chat_tokens=True`): markers are single ids;
- `plain_tok`: the default tiny tokenizer: `<think>` and the markers are several ids of text;
- `byte_tok`: a byte-level tokenizer (one token per byte, so CJK and emoji split across tokens) with the
  markers as added tokens, like DeepSeek's own vocabulary.
"""

from __future__ import annotations

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from moemesh.chat.tokens import CHAT_TOKENS
from moemesh.model.tiny_tokenizer import EOS_TOKEN, build_tiny_tokenizer
from moemesh.model.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def chat_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tiny-chat")
    build_tiny_tokenizer(out, 2048, chat_tokens=True)
    return Tokenizer.from_dir(out)


@pytest.fixture(scope="session")
def plain_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tiny-plain")
    build_tiny_tokenizer(out, 2048)
    return Tokenizer.from_dir(out)


def byte_level_tokenizer(chat_tokens: bool = True) -> Tokenizer:
    """One token per byte; EOS special; DeepSeek's chat tokens added as plain (not special) tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {EOS_TOKEN: 0} | {ch: i + 1 for i, ch in enumerate(alphabet)}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS_TOKEN])
    if chat_tokens:
        backend.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in CHAT_TOKENS])
    return Tokenizer(backend, eos_token=EOS_TOKEN, name="byte-level")


@pytest.fixture(scope="session")
def byte_tok() -> Tokenizer:
    return byte_level_tokenizer()


@pytest.fixture(scope="session")
def byte_plain_tok() -> Tokenizer:
    return byte_level_tokenizer(chat_tokens=False)
