"""The parser registries, detection from a tokenizer, and the tiny tokenizer's chat tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers

from moemesh.chat import REASONING_PARSERS, TOOL_PARSERS, detect_reasoning_parser, detect_tool_parser
from moemesh.chat.reasoning import DeepSeekR1ReasoningParser
from moemesh.chat.registry import REASONING_PARSER_CHOICES, TOOL_PARSER_CHOICES, make_reasoning_parser, make_tool_parser
from moemesh.chat.tokens import CHAT_TOKENS, THINK_CLOSE, TOOL_CALLS_BEGIN
from moemesh.chat.tool_parsers import DeepSeekV3ToolParser, DeepSeekV31ToolParser
from moemesh.model.tiny_tokenizer import ALPHABET, SPECIAL_TOKENS, build_tiny_tokenizer
from moemesh.model.tiny_tokenizer import CHAT_TOKENS as TINY_CHAT_TOKENS
from moemesh.model.tokenizer import Tokenizer

# The parts of DeepSeek's own chat templates that tell the formats apart (tokenizer_config.json).
V3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' and message['content'] is none %}"
    "{% for tool in message['tool_calls'] %}{{'<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}{% endfor %}{% endif %}{% endfor %}"
)
V31_TEMPLATE = (
    "{% for message in messages %}{% for tool in message['tool_calls'] %}"
    "{{'<｜tool▁call▁begin｜>'+ tool['function']['name'] + '<｜tool▁sep｜>' + tool['function']['arguments'] + "
    "'<｜tool▁call▁end｜>'}}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{'<｜Assistant｜>'}}{% if not thinking %}{{'</think>'}}{% else %}"
    "{{'<think>'}}{% endif %}{% endif %}"
)
R1_TEMPLATE = "{% if add_generation_prompt %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-chat-dir")
    build_tiny_tokenizer(out, 1024, chat_tokens=True)
    return out


def _with_template(folder: Path, template: str | None) -> Tokenizer:
    backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    return Tokenizer(backend, chat_template=template)


def test_registered_names() -> None:
    assert TOOL_PARSERS.names() == ("deepseek_v3", "deepseek_v31")
    assert REASONING_PARSERS.names() == ("deepseek_r1",)
    assert TOOL_PARSERS.load("deepseek_v3") is DeepSeekV3ToolParser
    assert TOOL_PARSERS.load("deepseek_v31") is DeepSeekV31ToolParser
    assert REASONING_PARSERS.load("deepseek_r1") is DeepSeekR1ReasoningParser
    assert TOOL_PARSER_CHOICES == ("auto", "deepseek_v3", "deepseek_v31")
    assert REASONING_PARSER_CHOICES == ("auto", "deepseek_r1")


@pytest.mark.parametrize(("template", "tool", "reasoning"), [
    (V3_TEMPLATE, "deepseek_v3", None),
    (V31_TEMPLATE, "deepseek_v31", "deepseek_r1"),
    (V3_TEMPLATE + R1_TEMPLATE, "deepseek_v3", "deepseek_r1"),
    (None, "deepseek_v3", None),
    ("{{ messages[0]['content'] }}<｜tool▁sep｜>", "deepseek_v31", None),
])
def test_detection_from_the_template(chat_dir: Path, template: str | None, tool: str, reasoning: str | None) -> None:
    tok = _with_template(chat_dir, template)
    assert detect_tool_parser(tok) == tool
    assert detect_reasoning_parser(tok) == reasoning
    parser = make_tool_parser("auto", tok)
    assert type(parser) is TOOL_PARSERS.load(tool)
    made = make_reasoning_parser("auto", tok)
    assert (made is None) if reasoning is None else isinstance(made, DeepSeekR1ReasoningParser)


def test_detection_without_the_markers(tmp_path: Path) -> None:
    build_tiny_tokenizer(tmp_path, 1024)
    tok = _with_template(tmp_path, V3_TEMPLATE)
    assert detect_tool_parser(tok) is None and make_tool_parser("auto", tok) is None
    with pytest.raises(ValueError, match=r"needs .* as single tokens"):
        make_tool_parser("deepseek_v3", tok)
    with pytest.raises(ValueError, match=r"unknown tool-call parser 'hermes'; choose one of deepseek_v3, deepseek_v31"):
        make_tool_parser("hermes", tok)
    # Text-keyed reasoning still works without the think tokens.
    assert not make_reasoning_parser("deepseek_r1", tok).keyed_on_ids


def test_tiny_tokenizer_chat_tokens(chat_dir: Path, tmp_path: Path) -> None:
    ids = build_tiny_tokenizer(tmp_path / "again", 1024, chat_tokens=True)
    tok = Tokenizer.from_dir(chat_dir)
    assert tok.vocab_size == 1024
    # DeepSeek's chat tokens are the vocabulary's last ids, each one token, kept by decode().
    assert [ids[name] for name, _ in TINY_CHAT_TOKENS] == list(range(1024 - len(CHAT_TOKENS), 1024))
    for name, token in TINY_CHAT_TOKENS:
        assert tok.token_to_id(token) == ids[name]
        assert tok.encode(f"a{token}b", add_special_tokens=False)[1] == ids[name]
        assert tok.decode([ids[name]]) == token
    text = f"x{TOOL_CALLS_BEGIN}y{THINK_CLOSE}z"
    assert tok.decode(tok.encode(text)) == text
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (chat_dir / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    # The default tokenizer has none of them.
    build_tiny_tokenizer(tmp_path / "plain", 1024)
    plain = Tokenizer.from_dir(tmp_path / "plain")
    assert all(plain.token_to_id(t) is None for t in CHAT_TOKENS)
    assert json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text()) == json.loads(
        (chat_dir / "tokenizer_config.json").read_text())
    smallest = len(SPECIAL_TOKENS) + len(ALPHABET) + len(CHAT_TOKENS)
    with pytest.raises(ValueError, match=f"vocab_size must be at least {smallest} "):
        build_tiny_tokenizer(tmp_path / "small", smallest - 1, chat_tokens=True)
    build_tiny_tokenizer(tmp_path / "small", smallest, chat_tokens=True)  # no merges at all, and it works
    assert Tokenizer.from_dir(tmp_path / "small").vocab_size == smallest

