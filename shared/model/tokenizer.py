"""A Hugging Face tokenizer folder, loaded without `transformers`: encode, decode, chat templates.

The gateway is the only service that sees text; everything behind it sees token ids. This module
gives it what `transformers.AutoTokenizer` would, from the same files, with the `tokenizers` library
and jinja2 only:

- `tokenizer.json`: the fast tokenizer itself (required).
- `tokenizer_config.json`: `bos_token`, `eos_token`, `add_bos_token`, `model_max_length`,
  `chat_template` (optional; `chat_template.jinja`, which newer `transformers` writes, wins over it).
- `generation_config.json`, `config.json`: `eos_token_id`, an int or a list; every id found is a
  stop token (optional).

BOS is added here, never by the `tokenizers` post-processor, so that text which already starts with
BOS (a rendered chat template does) does not get it twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
EOS_ID_FILES = ("generation_config.json", "config.json")

# `transformers` writes int(1e30) as model_max_length when a tokenizer has no limit of its own.
_NO_LIMIT = 10**20


class TokenizerError(ValueError):
    """A tokenizer folder or a chat request is unusable; the message names the file or the field."""


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template.

    Build it with `Tokenizer.from_dir`; the constructor takes already validated parts.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos_token: bool | None = None,
        eos_token_ids: Sequence[int] = (),
        model_max_length: int | None = None,
        chat_template: str | None = None,
        name: str = "tokenizer",
    ) -> None:
        """`eos_token_ids` are extra stop ids beyond `eos_token`'s; `name` is used in error messages."""
        self._backend = backend
        # Our own BOS handling replaces the post-processor's; truncation or padding saved in
        # tokenizer.json would silently change what the model sees.
        backend.no_truncation()
        backend.no_padding()
        self._name = name
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._bos_token_id = self._token_id(bos_token, "bos_token")
        eos_id = self._token_id(eos_token, "eos_token")
        ids = ([eos_id] if eos_id is not None else []) + list(eos_token_ids)
        self._eos_token_ids = tuple(dict.fromkeys(ids))
        self._add_bos = self._bos_token_id is not None if add_bos_token is None else bool(add_bos_token)
        if self._add_bos and self._bos_token_id is None:
            raise TokenizerError(f"{name}: add_bos_token is true but there is no bos_token")
        self._model_max_length = model_max_length
        self._chat_template = chat_template
        self._template = _compile_template(chat_template, name) if chat_template is not None else None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer folder (a model folder works too).

        Raises `TokenizerError` naming the file when a file is missing, is not valid JSON, or
        disagrees with the vocabulary.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"tokenizer folder {folder} does not exist or is not a folder")
        backend = _load_backend(folder / TOKENIZER_FILE)
        config_path = folder / TOKENIZER_CONFIG_FILE
        config = _read_json(config_path) or {}
        template = _chat_template_from(config, config_path)
        jinja_path = folder / CHAT_TEMPLATE_FILE
        if jinja_path.is_file():
            template = _read_text(jinja_path)
        extra_eos: list[int] = []
        for file_name in EOS_ID_FILES:
            extra_eos.extend(_eos_ids_from(folder / file_name))
        add_bos = config.get("add_bos_token")
        if add_bos is not None and not isinstance(add_bos, bool):
            raise TokenizerError(f"{config_path}: add_bos_token must be true or false, got {add_bos!r}")
        return cls(
            backend,
            bos_token=_token_content(config.get("bos_token"), "bos_token", config_path),
            eos_token=_token_content(config.get("eos_token"), "eos_token", config_path),
            add_bos_token=add_bos,
            eos_token_ids=extra_eos,
            model_max_length=_max_length_from(config.get("model_max_length"), config_path),
            chat_template=template,
            name=str(folder),
        )

    # -- ids and special tokens

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The `tokenizers` object underneath (for libraries that read a vocabulary, e.g. a grammar engine)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self._bos_token

    @property
    def eos_token(self) -> str | None:
        return self._eos_token

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: eos_token's first, then the configs' `eos_token_id`s."""
        return self._eos_token_ids

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_ids[0] if self._eos_token_ids else None

    @property
    def model_max_length(self) -> int | None:
        """The tokenizer config's context limit; None when it sets none."""
        return self._model_max_length

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def with_chat_template(self, template: str, source: str) -> Tokenizer:
        """This tokenizer with another chat template (e.g. `--chat-template FILE`); `source` names the
        template in errors. TokenizerError when it does not compile."""
        return Tokenizer(self._backend, bos_token=self._bos_token, eos_token=self._eos_token,
                         add_bos_token=self._add_bos, eos_token_ids=self._eos_token_ids,
                         model_max_length=self._model_max_length, chat_template=template, name=source)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # -- text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS first when the config asks for it and `text` lacks it."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self._add_bos and ids[:1] != [self._bos_token_id]:
            ids.insert(0, self._bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """Render `messages` (OpenAI chat format) to the prompt text, as `transformers` would.

        Text content parts are joined with newlines, as vLLM does. `extra` become template variables
        (e.g. `enable_thinking`); they cannot replace the ones named here.
        """
        if self._template is None:
            raise TokenizerError(f"{self._name} has no chat_template; this model cannot serve chat requests")
        if tools is not None and not (
            isinstance(tools, list) and all(isinstance(t, Mapping) for t in tools)
        ):
            raise TokenizerError("tools must be a list of objects")
        variables = {
            **extra,
            "messages": _normalize_messages(messages),
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self._bos_token or "",
            "eos_token": self._eos_token or "",
            "tools": tools,
        }
        try:
            return self._template.render(**variables)
        except TokenizerError:
            raise
        except Exception as exc:
            # The template is code from the model folder: whatever it does wrong is a template error.
            raise TokenizerError(f"chat template of {self._name} failed: {type(exc).__name__}: {exc}") from exc

    def _token_id(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self._name}: {field} {token!r} is not in the vocabulary")
        return token_id


# -- loading helpers


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from None


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None when the file is absent."""
    if not path.exists():
        return None
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TokenizerError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _load_backend(path: Path) -> tokenizers.Tokenizer:
    if not path.is_file():
        raise TokenizerError(f"{path} not found: a tokenizer folder needs a Hugging Face {TOKENIZER_FILE}")
    text = _read_text(path)
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as exc:
        # `tokenizers` reports JSON syntax and schema errors alike; tell them apart for the user.
        _read_json(path)
        raise TokenizerError(f"{path} is not a valid tokenizer file: {exc}") from None


def _token_content(value: Any, field: str, path: Path) -> str | None:
    """A special token as a string: configs write it as a string or as an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{path}: {field} must be a string or an object with a string 'content'")


def _chat_template_from(config: Mapping[str, Any], path: Path) -> str | None:
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        # The named form: [{"name": "default", "template": ...}, {"name": "tool_use", ...}].
        for entry in template:
            if isinstance(entry, Mapping) and entry.get("name") == "default":
                if isinstance(entry.get("template"), str):
                    return entry["template"]
                break
        raise TokenizerError(f"{path}: chat_template is a list without a 'default' template string")
    raise TokenizerError(f"{path}: chat_template must be a string or a list of named templates")


def _eos_ids_from(path: Path) -> list[int]:
    config = _read_json(path)
    if config is None:
        return []
    value = config.get("eos_token_id")
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise TokenizerError(f"{path}: eos_token_id must be a token id or a list of them, got {value!r}")
    return values


def _max_length_from(value: Any, path: Path) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise TokenizerError(f"{path}: model_max_length must be a positive integer, got {value!r}")
    return None if value >= _NO_LIMIT else value


# -- chat template rendering


def _raise_exception(message: str) -> NoReturn:
    raise TokenizerError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes HTML characters and sorts keys; templates expect plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(source: str, name: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(f"chat template of {name} is invalid: {exc.message} (line {exc.lineno})") from None


def _normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Copies of `messages` with string content; TokenizerError names the first bad field."""
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("messages must be a non-empty list of objects")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise TokenizerError(f"{where} must be an object, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise TokenizerError(f"{where}.role must be a non-empty string")
        if "content" not in message:
            raise TokenizerError(f"{where} has no content")
        out.append({**message, "content": _content_text(message["content"], role, where)})
    return out


def _content_text(content: Any, role: str, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        # OpenAI allows a null content on assistant turns that only call tools.
        return ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise TokenizerError(
                    f"{where}.content[{j}] must be a text part {{'type': 'text', 'text': str}};"
                    " other content types are not supported"
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise TokenizerError(f"{where}.content must be a string or a list of text parts, got {type(content).__name__}")
