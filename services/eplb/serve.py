"""`moemesh serve eplb`: the expert-parallel load balancer.

EP ranks stream windows of their expert load (`ReportExpertLoad`); the balancer keeps a sliding window
per EP group, exports its balancedness, and every `--rebalance-period-s` at most, when a new placement would raise
the group's mean balancedness by `--rebalance-min-gain` or more, publishes it to the group's watchers
(`WatchPlacement`), which switch at a step boundary.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from moemesh.service.config import apply_env_defaults
from moemesh.service.server import GrpcServer, announce, install_signal_handlers, run_service
from moemesh.service.tls import add_tls_arguments
from moemesh.services.eplb.policies import DEFAULT as DEFAULT_POLICY
from moemesh.services.eplb.policies import POLICIES
from moemesh.telemetry.metrics import announce_metrics
from moemesh.telemetry.setup import add_telemetry_arguments
from moemesh.v1 import eplb_pb2_grpc

DEFAULT_PORT = 50090
DEFAULT_METRICS_PORT = 9103


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moemesh serve eplb", description="Run the expert-parallel load balancer.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (internal service: loopback)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port (0 picks a free one)")
    p.add_argument("--balance-window-s", type=float, default=60.0, help="expert load older than this is forgotten")
    p.add_argument("--rebalance-period-s", type=float, default=30.0,
                   help="at most one new placement per group this often")
    p.add_argument("--rebalance-min-gain", type=float, default=0.05,
                   help="move experts only when the mean balancedness rises by at least this much")
    p.add_argument("--rebalance-min-tokens", type=int, default=1000,
                   help="routed (token, expert) pairs a group's window needs before a decision")
    p.add_argument("--policy", default=DEFAULT_POLICY, choices=POLICIES.names(),
                   help="placement algorithm (default refined: DeepSeek's EPLB improved by local search, never "
                        "worse on a layer; auto, hierarchical, global: DeepSeek's own; auto and refined go "
                        "hierarchical when the expert groups divide over the nodes)")
    add_tls_arguments(p)  # applied by run_service
    add_telemetry_arguments(p, DEFAULT_METRICS_PORT)
    apply_env_defaults(p)
    return p


async def serve(args: argparse.Namespace, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    from moemesh.services.eplb.servicer import EplbServicer
    from moemesh.services.eplb.state import Balancer, Policy

    stop = stop or asyncio.Event()
    install_signal_handlers(stop)
    servicer = EplbServicer(Balancer(Policy(window_s=args.balance_window_s, period_s=args.rebalance_period_s,
                                            min_gain=args.rebalance_min_gain, min_tokens=args.rebalance_min_tokens,
                                            policy=args.policy)))
    server = GrpcServer(args.host, args.port)
    server.add(eplb_pb2_grpc.add_EplbServicer_to_server, servicer, "moemesh.v1.Eplb")
    await server.start()
    await server.set_serving(True)
    decisions = asyncio.create_task(servicer.run(min(1.0, args.rebalance_period_s)), name="eplb-decisions")
    announce("eplb", server.address)
    announce_metrics()
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        decisions.cancel()
        await server.stop(1)


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(serve, build_parser().parse_args(argv), "eplb")


if __name__ == "__main__":
    sys.exit(main())
