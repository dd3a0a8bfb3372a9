"""What the gateway knows of the served model: its name, tokenizer, chat template and output parsers, and
context limit (no weights)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moemesh.chat.templates import TemplateNotFound, load_template
from moemesh.model.tokenizer import Tokenizer
from moemesh.services.gateway.chat_input import ChatRenderer
from moemesh.services.gateway.chat_output import ChatParsing, ParserSetupError
from moemesh.services.gateway.config import GatewayConfig


class ModelSetupError(ValueError):
    """The model folder cannot be served; the message names the file or the option to set."""


@dataclass(frozen=True)
class ServedModel:
    """The model this gateway serves: `renderer` turns chat messages into its prompts, `chat` splits its
    chat outputs (reasoning, tool calls)."""

    name: str
    path: Path
    tokenizer: Tokenizer
    max_model_len: int
    renderer: ChatRenderer
    chat: ChatParsing


def load_served_model(cfg: GatewayConfig) -> ServedModel:
    """Load the tokenizer of `cfg.model_dir` (or of the embedded tiny model) and find the context limit.

    The context limit is, first found: `cfg.max_model_len`, config.json's `max_position_embeddings`,
    the tokenizer config's `model_max_length`. `cfg.chat_template` replaces the model's template; the
    output parsers are chosen (or detected) with the template that will render.
    """
    path = Path(cfg.model_dir) if cfg.model_dir else _embedded_model_dir()
    tokenizer = Tokenizer.from_dir(path)
    if cfg.chat_template:
        try:
            tokenizer = tokenizer.with_chat_template(load_template(cfg.chat_template), cfg.chat_template)
        except TemplateNotFound as exc:
            raise ModelSetupError(f"--chat-template: {exc}") from None
    try:
        chat = ChatParsing.resolve(tokenizer, cfg.tool_call_parser, cfg.reasoning_parser)
    except ParserSetupError as exc:
        raise ModelSetupError(f"{path}: {exc}") from None
    limit = cfg.max_model_len or _max_position_embeddings(path / "config.json") or tokenizer.model_max_length
    if not limit:
        raise ModelSetupError(
            f"{path} sets no context limit (config.json max_position_embeddings or tokenizer_config.json "
            "model_max_length): pass --max-model-len")
    return ServedModel(name=cfg.served_model_name, path=path, tokenizer=tokenizer, max_model_len=int(limit),
                       renderer=ChatRenderer.build(tokenizer, chat.tool_parser), chat=chat)


def _embedded_model_dir() -> Path:
    # Imported here: writing the tiny checkpoint needs torch, which a gateway given --model never loads.
    from moemesh.model.default import default_model_dir

    return default_model_dir()


def _max_position_embeddings(path: Path) -> int | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise ModelSetupError(f"cannot read {path}: {exc}") from None
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelSetupError(f"{path}: max_position_embeddings must be a positive integer, got {value!r}")
    return value
