"""A service process's telemetry in one call: logging, tracing and the `/metrics` server.

    p = argparse.ArgumentParser()
    ...                                                   # the service's own options
    add_telemetry_arguments(p, default_metrics_port=9105)  # before apply_env_defaults(p)
    apply_env_defaults(p)
    args = p.parse_args()
    setup_telemetry("decode", args)                       # before asyncio.run(serve(args))
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from moemesh.telemetry import metrics
from moemesh.telemetry.logs import LOG_FORMATS, LOG_LEVELS, configure_logging
from moemesh.telemetry.tracing import configure_tracing


def add_telemetry_arguments(parser: argparse.ArgumentParser, default_metrics_port: int) -> None:
    """--metrics-port, --log-level and --log-format (each also MOEMESH_<DEST>), unless already there.

    `--metrics-port` left unset serves on `default_metrics_port`, or on a free port when that one is
    taken; an explicit port must be free; 0 picks a free port; -1 serves no metrics.
    """
    have = set(parser._option_string_actions)
    g = parser.add_argument_group("telemetry")
    if "--metrics-port" not in have:
        g.add_argument("--metrics-port", type=int, default=None,
                       help=f"port of the Prometheus /metrics endpoint on --host (default {default_metrics_port}, "
                            "or a free one when taken; 0 picks a free one; -1 disables)")
    if "--log-level" not in have:
        g.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="logging level (default: info)")
    if "--log-format" not in have:
        g.add_argument("--log-format", default="auto", choices=LOG_FORMATS,
                       help="log lines as JSON or for a terminal (default auto: console on a TTY, else JSON)")
    parser.set_defaults(_default_metrics_port=default_metrics_port)


@dataclass
class Telemetry:
    service: str
    log_format: str
    tracing: bool
    metrics: metrics.MetricsServer | None


def setup_telemetry(service: str, args: argparse.Namespace | None = None, *, host: str | None = None,
                    metrics_port: int | None = None, log_level: str | None = None,
                    log_format: str | None = None) -> Telemetry:
    """Configure this process for `service` ("gateway", "prefill", "decode", "kvtransfer", "eplb").

    Values come from the keyword arguments, else from `args` (the options `add_telemetry_arguments`
    added, and `--host`), else the defaults. The metrics server starts now (so /metrics answers while
    the model loads) and logs `SERVICE metrics on HOST:PORT`; call `announce_metrics()` right after the
    service prints its `SERVICE listening on ADDR` line to print the same on stdout. Raises OSError when
    an explicit metrics port is taken, RuntimeError for an exporter whose package is missing.
    """
    def pick(value: object, name: str, default: object) -> object:
        if value is not None:
            return value
        return getattr(args, name, default) if args is not None else default

    level = str(pick(log_level, "log_level", "info"))
    fmt = configure_logging(service, level, str(pick(log_format, "log_format", "auto")))
    traced = configure_tracing(service)
    port = pick(metrics_port, "metrics_port", None)
    default_port = getattr(args, "_default_metrics_port", None) if args is not None else None
    bind = str(pick(host, "host", "127.0.0.1"))
    server = metrics.start_metrics_server(service, bind, port, default_port)  # type: ignore[arg-type]
    return Telemetry(service, fmt, traced, server)
