"""`moemesh serve kvtransfer`: flags (and `MOEMESH_*` variables) to a config, then serve until stopped.

Programmatic use: `await serve(KvTransferConfig(port=0), ready=ready_event, stop=stop_event)`;
command line: `main(["--port", "0"])` or `python -m moemesh.services.kvtransfer.serve --port 0`.
When ready it prints `kvtransfer listening on HOST:PORT` to stdout (launchers read it); run from the
command line, then `kvtransfer metrics on HOST:PORT` (its Prometheus `/metrics`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from collections.abc import Sequence

from moemesh.service.config import apply_env_defaults, env_name
from moemesh.service.heap import run_settled
from moemesh.service.server import announce, install_signal_handlers, remove_signal_handlers
from moemesh.service.tls import add_tls_arguments, configure_tls_from_args
from moemesh.services.kvtransfer.config import KvTransferConfig
from moemesh.services.kvtransfer.service import KvTransferService
from moemesh.telemetry.metrics import announce_metrics
from moemesh.telemetry.setup import add_telemetry_arguments

log = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9102

_HELP = {
    "host": "address to listen on",
    "port": "port to listen on (0 picks a free one)",
    "default_lease_ms": "a room's lease when its creator asks for none",
    "max_lease_ms": "the longest lease a room gets",
    "default_wait_ms": "how long ResolveReceiver waits for the receiver when the request says 0",
    "max_wait_ms": "the longest ResolveReceiver waits for the receiver",
    "retention_s": "how long ended rooms are kept so late reports and watches see the outcome",
    "max_rooms": "rooms held at once (live plus retained)",
    "relay_queue_chunks": "chunks buffered per room before a push waits",
    "relay_room_max_bytes": "bytes buffered per room before a push waits (a bigger chunk is refused)",
    "relay_total_max_bytes": "bytes buffered over all rooms before pushes are refused",
    "sweep_interval_s": "how often expired leases are failed and retained rooms forgotten",
    "drain_s": "on stop, how long live rooms may still finish (health NOT_SERVING, no new rooms)",
    "shutdown_grace_s": "on stop, how long in-flight calls get before they are cancelled",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add an option per `KvTransferConfig` field (plus mutual TLS: --tls-cert/--tls-key/--tls-ca, and the
    telemetry options: --log-level, --log-format, --metrics-port); each also reads `MOEMESH_<DEST>`.

    Applies the environment to every option the parser has so far, so call it after adding others.
    """
    for field in dataclasses.fields(KvTransferConfig):
        default = field.default
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(default), default=default,
                            help=f"{_HELP[field.name]} (default {default}; env {env_name(field.name)})")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help=f"logging level (env {env_name('log_level')})")
    add_tls_arguments(parser)
    add_telemetry_arguments(parser, DEFAULT_METRICS_PORT)
    apply_env_defaults(parser)


def config_from_args(args: argparse.Namespace) -> KvTransferConfig:
    """The config the parsed options describe; ValueError when they are inconsistent."""
    return KvTransferConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(KvTransferConfig)})


async def serve(cfg: KvTransferConfig, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set or SIGINT/SIGTERM arrives, then drain and return.

    Sets `ready` (and prints the listening line) once the server is up and reports SERVING.
    """
    stop = stop if stop is not None else asyncio.Event()
    signals = install_signal_handlers(stop)
    try:
        svc = KvTransferService(cfg)
        await svc.start()
        try:
            announce("kvtransfer", svc.address)
            announce_metrics()
            if ready is not None:
                ready.set()
            await stop.wait()
            log.info("kvtransfer stopping")
        finally:
            await svc.stop()
    finally:
        remove_signal_handlers(signals)


def run(args: argparse.Namespace) -> int:
    """Serve with parsed options (what the `moemesh serve kvtransfer` subcommand calls); exit code."""
    from moemesh.telemetry.setup import setup_telemetry

    try:
        cfg = config_from_args(args)
        configure_tls_from_args(args)  # the server (and any channel) of this process: mTLS or none
    except ValueError as e:
        print(f"moemesh: error: {e}", file=sys.stderr)
        return 2
    try:
        setup_telemetry("kvtransfer", args)
    except (OSError, RuntimeError) as e:
        print(f"moemesh: error: {e}", file=sys.stderr)
        return 2
    try:
        run_settled(serve, cfg)
    except OSError as e:  # the port is taken, the host cannot be bound
        print(f"moemesh: error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`moemesh serve kvtransfer [options]` on its own."""
    parser = argparse.ArgumentParser(prog="moemesh serve kvtransfer",
                                     description="The KV handoff's control plane and relay data plane.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
