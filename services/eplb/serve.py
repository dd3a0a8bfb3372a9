"""`moemesh serve eplb`: for now a placeholder that serves health and reflection only."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from shared.service.config import apply_env_defaults
from shared.service.server import GrpcServer, install_signal_handlers, run_service
from shared.telemetry.metrics import announce_metrics
from shared.telemetry.setup import add_telemetry_arguments

DEFAULT_PORT = 50090
DEFAULT_METRICS_PORT = 9103


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moemesh serve eplb", description="Run the expert-parallel load balancer.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port (0 picks a free one)")
    add_telemetry_arguments(p, DEFAULT_METRICS_PORT)
    apply_env_defaults(p)
    return p


async def serve(args: argparse.Namespace, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    install_signal_handlers(stop)
    server = GrpcServer(args.host, args.port)
    await server.start()
    await server.set_serving(True)
    print(f"eplb listening on {server.address}", flush=True)
    announce_metrics()
    if ready is not None:
        ready.set()
    await stop.wait()
    await server.stop(1)


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(serve, build_parser().parse_args(argv), "eplb")


if __name__ == "__main__":
    sys.exit(main())
