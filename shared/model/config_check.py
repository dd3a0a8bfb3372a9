"""A model folder's config.json checked field by field: by `ModelConfig.from_dir`, and once up front by the commands
that start engines (`moemesh up`, `generate`).

Every process of a mesh reads config.json itself; a bad field found there surfaces seconds later as one
worker's traceback. Checked here first, before anything starts, a bad folder or field is one line that names
the folder or the field and its value.

The types come from `ModelConfig`'s own annotations (its field names are config.json's keys), so that a field
added there is checked here without a second list to keep in step.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from moemesh.model.config import SUPPORTED_MODEL_TYPES, ModelConfig, ModelConfigError

# ModelConfig fields that are no config.json key of the same name: each is read from other keys, checked below.
_DERIVED = {"model_type", "rope", "eos_token_ids", "quant_block_size"}
# How ModelConfig.from_hf_dict words a missing key or a value its conversions refused.
_MALFORMED = "config.json is missing or has a malformed field"
# Keys inside `rope_scaling` / `rope_parameters` and what each must be.
_ROPE_KEYS = {"factor": "number", "beta_fast": "number", "beta_slow": "number", "mscale": "number",
              "mscale_all_dim": "number", "attention_factor": "number", "rope_theta": "number",
              "original_max_position_embeddings": "integer", "type": "string", "rope_type": "string",
              "truncate": "boolean"}


def check_model_dir(model: str | Path) -> Path:
    """`model` as an absolute folder whose config.json moemesh can serve; ModelConfigError otherwise, its message
    naming the folder, or the field and its bad value."""
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelConfigError(f"model folder {model} does not exist")
    if not path.is_dir():
        raise ModelConfigError(f"model folder {model} is not a folder")
    file = path / "config.json"
    if not file.is_file():
        raise ModelConfigError(f"{file} not found: a model folder needs a Hugging Face config.json")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelConfigError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{file} must hold a JSON object")
    check_config_dict(raw, file)
    return path.absolute()


def check_config_dict(raw: dict[str, Any], where: str | Path = "config.json") -> ModelConfig:
    """The ModelConfig of a parsed config.json, every field's type checked first; ModelConfigError names `where`,
    the field and its value."""
    if raw.get("model_type") in SUPPORTED_MODEL_TYPES:  # an unsupported model: ModelConfig says it best
        for key, kind in _field_kinds().items():
            if key in raw:
                _check(raw[key], kind, key, where)
        for key in ("rope_scaling", "rope_parameters"):
            section = _check(raw.get(key), "object", key, where)
            for sub, kind in _ROPE_KEYS.items():
                if section and sub in section:
                    _check(section[sub], kind, f"{key}.{sub}", where)
        _check(raw.get("rope_theta"), "number", "rope_theta", where)
        _check(raw.get("dtype"), "string", "dtype", where)
        eos = raw.get("eos_token_id")
        if isinstance(eos, list):
            for i, token in enumerate(eos):
                _check(token, "integer", f"eos_token_id[{i}]", where)
        else:
            _check(eos, "integer", "eos_token_id", where)
        quant = _check(raw.get("quantization_config"), "object", "quantization_config", where)
        block = quant.get("weight_block_size") if quant else None
        if block is not None and not (isinstance(block, list) and len(block) == 2
                                      and all(_is(x, "integer") and x > 0 for x in block)):
            raise ModelConfigError(f"{where}: quantization_config.weight_block_size must be two positive "
                                   f"integers, got {block!r}")
    try:
        return ModelConfig.from_hf_dict(raw)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        msg = str(e)
        malformed = not isinstance(e, ModelConfigError) or msg.startswith(_MALFORMED)
        if malformed:
            # A null is let through above (the parser defaults some of them); where one cannot be, it is the cause.
            for key, kind in _field_kinds(required=True).items():
                if key in raw and raw[key] is None:
                    raise ModelConfigError(f"{where}: {key} must be {_an(kind)}, got None") from None
        if isinstance(e, ModelConfigError) and msg.startswith("config.json "):  # its own words, with the path
            raise ModelConfigError(f"{where} {msg.removeprefix('config.json ')}") from None
        if isinstance(e, ModelConfigError):
            raise ModelConfigError(f"{where}: {msg}") from None
        raise ModelConfigError(f"{where}: malformed field ({type(e).__name__}: {msg})") from None


def _field_kinds(required: bool = False) -> dict[str, str]:
    """config.json key -> "integer", "number", "boolean" or "string", from ModelConfig's annotations; with
    `required`, only the fields that cannot be None."""
    hints = typing.get_type_hints(ModelConfig)
    kinds = {int: "integer", float: "number", bool: "boolean", str: "string"}
    out = {}
    for f in dataclasses.fields(ModelConfig):
        if f.name in _DERIVED:
            continue
        args = typing.get_args(hints[f.name]) or (hints[f.name],)
        optional = type(None) in args
        args = tuple(a for a in args if a is not type(None))
        if len(args) == 1 and args[0] in kinds and not (required and optional):
            out[f.name] = kinds[args[0]]
    return out


def _is(value: Any, kind: str) -> bool:
    # bool is an int to Python, never a count or a size to a config.
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "boolean":  # 0/1 as well: bool() of them means what the writer meant, unlike bool("false")
        return isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))
    if kind == "string":
        return isinstance(value, str)
    return isinstance(value, dict)  # "object"


def _check(value: Any, kind: str, key: str, where: str | Path) -> Any:
    """`value` itself when it is null or of `kind`; ModelConfigError naming `key` and the value otherwise."""
    if value is None or _is(value, kind):
        return value
    raise ModelConfigError(f"{where}: {key} must be {_an(kind)}, got {value!r}")


def _an(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
