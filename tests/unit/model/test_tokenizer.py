"""Tokenizer loading, chat templates, streaming detokenization and the tiny model's tokenizer."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from moemesh.model.detokenizer import IncrementalDetokenizer
from moemesh.model.tiny_tokenizer import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    UNK_TOKEN,
    USER_TOKEN,
    WHITESPACE,
    build_tiny_tokenizer,
)
from moemesh.model.tokenizer import Tokenizer, TokenizerError

ASCII_TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; 3.14159 is close to pi.",
    "def main():\n    return {'a': [1, 2, 3]}  # two spaces\n\n\n",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows lines\n",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ 0123456789",
    "MiXeD CaSe words, and the others THAT shout",
    " a  b   c    d",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    build_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_dir)


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def _visible(text: str) -> bool:
    return any(c.isprintable() and not c.isspace() for c in text)


# -- the tiny tokenizer


def test_tiny_special_tokens_and_config(tiny_dir: Path, tiny: Tokenizer) -> None:
    ids = build_tiny_tokenizer(tiny_dir / "again")
    assert ids["bos_token_id"] == 0 and ids["eos_token_id"] == 1
    assert tiny.bos_token_id == 0 and tiny.eos_token_ids == (1,) and tiny.eos_token_id == 1
    assert tiny.bos_token == BOS_TOKEN and tiny.eos_token == EOS_TOKEN
    assert tiny.token_to_id(USER_TOKEN) == ids["user_token_id"]
    assert tiny.token_to_id(ASSISTANT_TOKEN) == ids["assistant_token_id"]
    assert tiny.model_max_length == 4096
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["add_bos_token"] is True


@pytest.mark.parametrize("vocab_size", [1024, 4096])
def test_tiny_vocab_size_exact_and_fast(tmp_path: Path, vocab_size: int) -> None:
    start = time.perf_counter()
    build_tiny_tokenizer(tmp_path, vocab_size)
    assert time.perf_counter() - start < 2.0
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.vocab_size == vocab_size
    assert len(tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab()) == vocab_size


@pytest.mark.parametrize("vocab_size", [10, 10**6])
def test_tiny_vocab_size_out_of_range(tmp_path: Path, vocab_size: int) -> None:
    with pytest.raises(ValueError, match="vocab_size must be at"):
        build_tiny_tokenizer(tmp_path, vocab_size)


def test_tiny_build_is_deterministic(tmp_path: Path) -> None:
    build_tiny_tokenizer(tmp_path / "a", 2048)
    build_tiny_tokenizer(tmp_path / "b", 2048)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("vocab_size", [1024, 4096])
def test_tiny_every_token_is_visible_and_reachable(tmp_path: Path, vocab_size: int) -> None:
    build_tiny_tokenizer(tmp_path, vocab_size)
    tok = Tokenizer.from_dir(tmp_path)
    whitespace_tokens = []
    for token_id in range(tok.vocab_size):
        text = tok.decode([token_id], skip_special_tokens=False)
        if tok.decode([token_id]) == "":  # special
            continue
        if not _visible(text):
            whitespace_tokens.append(text)
        # Every merge is used: the token's own text encodes back to it.
        assert tok.encode(text, add_special_tokens=False) == [token_id]
    assert sorted(whitespace_tokens) == sorted(WHITESPACE)


@pytest.mark.parametrize("text", ASCII_TEXTS)
def test_tiny_ascii_round_trip(tiny: Tokenizer, text: str) -> None:
    ids = tiny.encode(text)
    assert ids[0] == tiny.bos_token_id
    assert tiny.decode(ids) == text
    assert tiny.decode(tiny.encode(text, add_special_tokens=False)) == text


def test_tiny_non_ascii(tiny: Tokenizer) -> None:
    latin = "Café crème, naïve façade — “quoted” … £5"
    assert tiny.decode(tiny.encode(latin)) == latin
    ids = tiny.encode("abc 中文 🎉!")
    unk = tiny.token_to_id(UNK_TOKEN)
    assert ids.count(unk) == 3
    assert tiny.decode(ids) == "abc  !"
    assert tiny.decode(ids, skip_special_tokens=False) == f"{BOS_TOKEN}abc {UNK_TOKEN}{UNK_TOKEN} {UNK_TOKEN}!"


def test_tiny_chat_template(tiny: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": [{"type": "text", "text": "How"}, {"type": "text", "text": "are you?"}]},
    ]
    expected = (
        f"{BOS_TOKEN}Be brief.\n\nBe kind.{USER_TOKEN}Hi{ASSISTANT_TOKEN}Hello!{EOS_TOKEN}"
        f"{USER_TOKEN}How\nare you?"
    )
    assert tiny.apply_chat_template(messages) == expected + ASSISTANT_TOKEN
    assert tiny.apply_chat_template(messages, add_generation_prompt=False) == expected
    no_system = tiny.apply_chat_template([{"role": "user", "content": "x"}])
    assert no_system == f"{BOS_TOKEN}{USER_TOKEN}x{ASSISTANT_TOKEN}"
    # The rendered prompt starts with BOS already: encode must not add a second one.
    ids = tiny.encode(no_system)
    assert ids.count(tiny.bos_token_id) == 1 and ids[0] == tiny.bos_token_id
    with pytest.raises(TokenizerError, match="not tool"):
        tiny.apply_chat_template([{"role": "tool", "content": "42"}])


def test_tiny_matches_transformers(tiny_dir: Path, tiny: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    assert len(hf) == tiny.vocab_size
    assert (hf.bos_token_id, hf.eos_token_id) == (tiny.bos_token_id, tiny.eos_token_id)
    for text in [*ASCII_TEXTS, "Café 中文"]:
        ids = tiny.encode(text)
        assert hf.encode(text) == ids
        assert hf.encode(text, add_special_tokens=False) == tiny.encode(text, add_special_tokens=False)
        assert hf.decode(ids, skip_special_tokens=True) == tiny.decode(ids)
        assert hf.decode(ids) == tiny.decode(ids, skip_special_tokens=False)
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    prompt = tiny.apply_chat_template(messages)
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == prompt
    hf_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    hf_ids = hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids  # a BatchEncoding in v5
    assert list(hf_ids) == tiny.encode(prompt)


# -- loading any tokenizer folder


def _byte_level_backend() -> tokenizers.Tokenizer:
    """A GPT-2-style byte-level tokenizer: one token per byte, plus two special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 0, "</s>": 1} | {ch: i + 2 for i, ch in enumerate(alphabet)}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "</s>"])
    return backend


def _write_folder(path: Path, config: dict | None = None, backend: tokenizers.Tokenizer | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (backend or _byte_level_backend()).save(str(path / "tokenizer.json"))
    if config is not None:
        _write_json(path / "tokenizer_config.json", config)
    return path


def test_missing_folder_and_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json not found"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    "file_name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"]
)
def test_malformed_json_names_the_file(tmp_path: Path, file_name: str) -> None:
    _write_folder(tmp_path, {"bos_token": "<s>"})
    (tmp_path / file_name).write_text('{"bos_token": "<s>",', encoding="utf-8")
    with pytest.raises(TokenizerError) as info:
        Tokenizer.from_dir(tmp_path)
    message = str(info.value)
    assert file_name in message and "not valid JSON" in message
    assert "Traceback" not in message and "\n" not in message


def test_invalid_tokenizer_file(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    _write_json(tmp_path / "tokenizer.json", {"model": {"type": "Nonsense"}})
    with pytest.raises(TokenizerError, match=r"tokenizer\.json is not a valid tokenizer file"):
        Tokenizer.from_dir(tmp_path)


def test_special_tokens_from_configs(tmp_path: Path) -> None:
    config = {
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False},
        "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656,
    }
    _write_folder(tmp_path, config)
    _write_json(tmp_path / "generation_config.json", {"eos_token_id": [1, 7]})
    _write_json(tmp_path / "config.json", {"eos_token_id": 9, "bos_token_id": 0})
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_token_id == 0
    assert tok.eos_token_ids == (1, 7, 9) and tok.eos_token_id == 1
    assert tok.model_max_length is None
    assert tok.vocab_size == 258
    assert tok.encode("hi") == [0, *tok.encode("hi", add_special_tokens=False)]
    assert tok.encode("<s>hi") == tok.encode("hi")


def test_no_bos_without_config(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(_write_folder(tmp_path))
    assert tok.bos_token_id is None and tok.eos_token_ids == () and tok.eos_token_id is None
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)
    with pytest.raises(TokenizerError, match="has no chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_add_bos_token_false(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(_write_folder(tmp_path, {"bos_token": "<s>", "add_bos_token": False}))
    assert tok.bos_token_id == 0 and tok.encode("hi")[0] != 0


def test_special_token_outside_vocab(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"eos_token": "<|eot|>"})
    with pytest.raises(TokenizerError, match=re.escape("eos_token '<|eot|>' is not in the vocabulary")):
        Tokenizer.from_dir(tmp_path)


# -- chat templates


def _template_tokenizer(tmp_path: Path, template: object) -> Tokenizer:
    return Tokenizer.from_dir(_write_folder(tmp_path, {"bos_token": "<s>", "chat_template": template}))


def test_named_template_list_picks_default(tmp_path: Path) -> None:
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ bos_token }}D"}]
    assert _template_tokenizer(tmp_path, templates).apply_chat_template([{"role": "user", "content": ""}]) == "<s>D"


def test_chat_template_jinja_file_wins(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"chat_template": "from config"})
    (tmp_path / "chat_template.jinja").write_text("from file", encoding="utf-8")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": ""}]) == "from file"


def test_template_globals_and_filters(tmp_path: Path) -> None:
    template = (
        "{{ tools | tojson(indent=2) }}|{{ messages[0]['content'] | tojson }}|{{ strftime_now('%Y') }}"
        "|{{ add_generation_prompt }}|{{ eos_token }}|{{ mood }}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}|{{ m.role }}{% endfor %}"
    )
    tok = _template_tokenizer(tmp_path, template)
    tools = [{"name": "f", "x": "é<"}]
    out = tok.apply_chat_template(
        [{"role": "user", "content": "a\"b"}, {"role": "user", "content": "c"}], tools=tools, mood="calm"
    )
    assert out == (
        f"{json.dumps(tools, indent=2, ensure_ascii=False)}|\"a\\\"b\"|{time.strftime('%Y')}|True||calm|user"
    )


def test_template_raise_exception_and_failures(tmp_path: Path) -> None:
    tok = _template_tokenizer(tmp_path / "a", "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TokenizerError, match=r"^roles must alternate$"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    # The sandbox is immutable: a template cannot change the caller's messages.
    tok = _template_tokenizer(tmp_path / "b", "{% set _ = messages.append(1) %}")
    with pytest.raises(TokenizerError, match=r"chat template of .* failed"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(TokenizerError, match="is invalid"):
        _template_tokenizer(tmp_path / "c", "{% if %}")


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"content": "x"}], r"messages\[0\]\.role"),
        ([{"role": 3, "content": "x"}], r"messages\[0\]\.role"),
        ([{"role": "user"}], r"messages\[0\] has no content"),
        ([{"role": "user", "content": "x"}, {"role": "user", "content": 5}], r"messages\[1\]\.content must be"),
        ([{"role": "user", "content": None}], r"messages\[0\]\.content must be"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], r"content\[0\] must be a text"),
    ],
)
def test_bad_messages(tiny: Tokenizer, messages: object, error: str) -> None:
    with pytest.raises(TokenizerError, match=error):
        tiny.apply_chat_template(messages)  # type: ignore[arg-type]


def test_assistant_tool_call_without_content(tiny: Tokenizer) -> None:
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": []}]
    assert tiny.apply_chat_template(messages, add_generation_prompt=False).endswith(ASSISTANT_TOKEN + EOS_TOKEN)


# -- streaming detokenization


def _stream(tok: Tokenizer, output_ids: list[int], prompt_ids: Sequence[int] = (), **kwargs: bool) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids, **kwargs)
    deltas = [detok.add(token_id) for token_id in output_ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    assert detok.output_ids == list(output_ids)
    return deltas


def test_detokenizer_holds_back_split_utf8(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(_write_folder(tmp_path, {"bos_token": "<s>", "eos_token": "</s>"}))
    prompt = tok.encode("Say: ")
    text = "héllo wörld, 你好 🎉 ok"
    output = tok.encode(text, add_special_tokens=False)
    assert len(output) == len(text.encode("utf-8"))  # one token per byte
    deltas = _stream(tok, output, prompt)
    assert "".join(deltas) == tok.decode(output) == text
    assert not any("\ufffd" in d for d in deltas)
    # The 4-byte emoji arrives in its last byte's delta, after three empty ones.
    emoji_end = len("héllo wörld, 你好 🎉".encode())
    assert deltas[emoji_end - 4 : emoji_end] == ["", "", "", "🎉"]


def test_detokenizer_flushes_incomplete_tail(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(_write_folder(tmp_path))
    output = tok.encode("ab🎉", add_special_tokens=False)[:-1]
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(t) for t in output] == ["a", "b", "", "", ""]
    assert detok.flush() == tok.decode(output)[2:]
    assert detok.text == tok.decode(output)


def test_detokenizer_tiny_with_prompt_and_specials(tiny: Tokenizer) -> None:
    prompt = tiny.encode(tiny.apply_chat_template([{"role": "user", "content": "Hello there"}]))
    text = "The answer is 42.\n\n  Indented, with    spaces and Café!"
    output = [*tiny.encode(text, add_special_tokens=False), tiny.eos_token_id]
    deltas = _stream(tiny, output, prompt)
    assert "".join(deltas) == tiny.decode(output) == text
    deltas = _stream(tiny, output, prompt, skip_special_tokens=False)
    assert "".join(deltas) == tiny.decode(output, skip_special_tokens=False) == text + EOS_TOKEN


def test_detokenizer_keeps_metaspace_leading_space(tmp_path: Path) -> None:
    backend = tokenizers.Tokenizer(models.WordLevel({"▁Hello": 0, "▁world": 1, "<unk>": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tok = Tokenizer.from_dir(_write_folder(tmp_path, backend=backend))
    # After a prompt, the first word keeps the space that separates it from the prompt...
    assert _stream(tok, [1, 1], [0]) == [" world", " world", ""]
    # ...and without one it starts the text, as decode() has it.
    assert "".join(_stream(tok, [0, 1])) == tok.decode([0, 1]) == "Hello world"
