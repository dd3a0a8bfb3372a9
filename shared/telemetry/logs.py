"""Logging through structlog: JSON lines in production, readable lines in a terminal, one format for all.

`configure_logging(service)` routes the standard library's logging (every `logging.getLogger(...)` in
the code base, grpc's and others') through structlog's formatter, so a line looks the same whoever
wrote it. Every line carries `timestamp`, `level`, `logger`, `service`, `event`, whatever the request
context bound (`request_id`, `trace_id`) and, inside a span, the current `trace_id` and `span_id`.

Format: `MOEMESH_LOG_FORMAT` (or `--log-format`): `json`, `console`, or `auto` (the default:
console when stderr is a terminal, JSON otherwise). A launcher (`moemesh up`) decides once for all its children
with `launcher_log_env`: they write to the stream it hands them, and one format in one stream reads best; on a
terminal it also keeps them to warnings, the launcher's own table being what a person wants to see there.

Per request: `with request_log_context(request_id): ...` (or `bind_request(request_id)` in a task that
ends with the request) binds `request_id` and the current `trace_id` in contextvars.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, MutableMapping
from typing import IO, Any

import structlog
from opentelemetry import trace

LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
_HANDLER_NAME = "moemesh-structlog"


def add_trace_context(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Processor: the current span's trace_id and span_id (unless the context already bound a trace_id)."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        if not event.get("trace_id"):
            event["trace_id"] = format(ctx.trace_id, "032x")
        event.setdefault("span_id", format(ctx.span_id, "016x"))
    return event


def _add_service(service: str) -> Any:
    def processor(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("service", service)
        return event

    return processor


def resolve_format(fmt: str | None, stream: IO[str]) -> str:
    """`json` or `console` for a requested format (None: MOEMESH_LOG_FORMAT, then auto)."""
    fmt = (fmt or os.environ.get("MOEMESH_LOG_FORMAT") or "auto").strip().lower()
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    if fmt == "auto":
        return "console" if _isatty(stream) else "json"
    return fmt


def _isatty(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


def launcher_log_env(fmt: str | None, level: str | None, stream: IO[str]) -> dict[str, str]:
    """`MOEMESH_LOG_FORMAT` and `MOEMESH_LOG_LEVEL` for the children of a launcher, whose logs go to `stream`.

    `fmt` None: MOEMESH_LOG_FORMAT, then auto; auto: console when `stream` is a terminal, JSON otherwise (as each
    child would decide, but decided once, for the stream they share, and named to them explicitly). `level`
    None: MOEMESH_LOG_LEVEL, else `warning` on a terminal (quiet) and `info` otherwise (a file or a log
    collector keeps everything). ValueError for an unknown format or level.
    """
    level = (level or os.environ.get("MOEMESH_LOG_LEVEL") or ("warning" if _isatty(stream) else "info"))
    level = level.strip().lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return {"MOEMESH_LOG_FORMAT": resolve_format(fmt, stream), "MOEMESH_LOG_LEVEL": level}


def configure_logging(service: str, level: str | int = "info", fmt: str | None = None,
                      stream: IO[str] | None = None) -> str:
    """Send every log record of this process to `stream` (default stderr) in one format; returns it.

    Replaces the root logger's handlers (what logging.basicConfig would have installed).
    """
    stream = stream if stream is not None else sys.stderr
    fmt = resolve_format(fmt, stream)
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    pre_chain: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _add_service(service),
        add_trace_context,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *pre_chain,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    if fmt == "json":
        final: list[Any] = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        final = [structlog.dev.ConsoleRenderer(colors=_isatty(stream))]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=pre_chain,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return fmt


def get_logger(name: str | None = None) -> Any:
    """A structlog logger (key-value events) writing through the same handler as stdlib logging."""
    return structlog.stdlib.get_logger(name)


def bind_request(request_id: str, **fields: Any) -> dict[str, Any]:
    """Bind `request_id` (and the current trace_id) for every later log line of this task; returns the
    reset tokens for `unbind_request`. Fields that are None are left out."""
    fields = {key: value for key, value in fields.items() if value is not None}
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        fields.setdefault("trace_id", format(ctx.trace_id, "032x"))
    return structlog.contextvars.bind_contextvars(request_id=request_id, **fields)


def unbind_request(tokens: dict[str, Any]) -> None:
    """Undo `bind_request`; tolerant of being called from another context than the one that bound."""
    try:
        structlog.contextvars.reset_contextvars(**tokens)
    except ValueError:  # e.g. an async generator resumed in another task: just drop the keys
        structlog.contextvars.unbind_contextvars(*tokens)


@contextlib.contextmanager
def request_log_context(request_id: str, **fields: Any) -> Iterator[None]:
    """Log lines inside the block carry `request_id` and the current `trace_id` (and `fields`)."""
    tokens = bind_request(request_id, **fields)
    try:
        yield
    finally:
        unbind_request(tokens)
