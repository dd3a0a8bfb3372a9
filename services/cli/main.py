"""Entry point of the `moemesh` command: parses the subcommand and maps known errors to clean exits."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from moemesh.bench import cli as bench
from moemesh.service import cpus
from moemesh.services.cli import complete, down, eplb_cmd, generate, make_tiny, serve, up
from moemesh.version import package_version

# Errors a user can cause with bad input: printed as one line, never as a traceback.
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moemesh", description="Serve DeepSeek-style mixture-of-experts models.")
    parser.add_argument("--version", action="version", version=f"moemesh {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (generate, up, down, complete, serve, make_tiny, bench, eplb_cmd):
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cpus.apply_from_env()  # before any thread starts, so that every thread inherits the cores
    except ValueError as e:
        print(f"moemesh: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    parser = build_parser()
    args = parser.parse_args(argv)
    # As typed: `up --detach` runs it again in the background, options exactly as they were given.
    args.cli_argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except user_errors() as e:
        print(f"moemesh: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that describe bad input rather than a bug in moemesh."""
    from moemesh.engine.sampling_params import InvalidParameter
    from moemesh.engine.scheduler import RequestTooLong
    from moemesh.model.config import ModelConfigError
    from moemesh.model.loader import CheckpointError
    from moemesh.model.tokenizer import TokenizerError
    from moemesh.transfer.base import PlaneUnavailable

    return (InvalidParameter, RequestTooLong, ModelConfigError, CheckpointError, TokenizerError, PlaneUnavailable,
            FileNotFoundError, NotADirectoryError, PermissionError)


if __name__ == "__main__":
    sys.exit(main())
