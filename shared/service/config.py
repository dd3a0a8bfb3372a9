"""Options from flags or `MOEMESH_`-prefixed environment variables (how containers configure services).

Every option a `moemesh serve ...` parser declares can also be set as `MOEMESH_<DEST>` (the option's
destination upper-cased: `--kv-cache-mb` is `MOEMESH_KV_CACHE_MB`). A flag on the command line wins
over the variable, and the variable over the default. Values go through the option's own `type` and
`choices`, so a bad variable fails like a bad flag.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

ENV_PREFIX = "MOEMESH_"


def env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


def apply_env_defaults(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """Replace each option's default with its environment variable, when set."""
    environ = os.environ if environ is None else environ
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", argparse.SUPPRESS):
            continue
        raw = environ.get(env_name(action.dest))
        if raw is None:
            continue
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            value: object = raw.strip().lower() in ("1", "true", "yes", "on")
        elif isinstance(action, argparse._AppendAction):
            value = [_convert(action, v) for v in raw.split(",") if v]
        else:
            value = _convert(action, raw)
        if action.choices is not None and value not in action.choices:
            parser.error(f"{env_name(action.dest)}={raw!r}: choose from {', '.join(map(str, action.choices))}")
        action.default = value
        action.required = False


def _convert(action: argparse.Action, raw: str) -> object:
    if action.type is None:
        return raw
    try:
        return action.type(raw)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"moemesh: error: {env_name(action.dest)}={raw!r}: {e}") from None
