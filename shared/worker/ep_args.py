"""Expert-parallel options of the engine services, and the launcher that starts a node's ranks.

`moemesh serve prefill|decode --ep-size K` on one host starts K rank processes (each a full DP-attention
worker with its own gRPC port: --port + local rank); across hosts, each of `--nnodes` runs K / nnodes of
them (`--node-rank`, rendezvous at `--dist-init-addr` on node 0). `--ep-rank R` runs exactly one rank in
this process: what the launcher, `moemesh up` and one-pod-per-rank deployments use.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from moemesh.ep.backends import DISPATCHERS, GEMMS

if TYPE_CHECKING:
    from moemesh.ep.group import EPConfig


def add_ep_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("expert parallelism")
    g.add_argument("--ep-size", type=int, default=1, help="ranks in this instance's EP group (DP attention)")
    g.add_argument("--nnodes", type=int, default=1, help="hosts the EP group spans (each runs ep-size/nnodes ranks)")
    g.add_argument("--node-rank", type=int, default=0, help="this host's index among --nnodes")
    g.add_argument("--dist-init-addr", default="",
                   help="host:port of the group's rendezvous, on node 0 (default with one node: a free local port)")
    g.add_argument("--ep-rank", type=int, default=None,
                   help="run exactly this rank in this process (default: start this node's ranks)")
    g.add_argument("--redundant-experts", type=int, default=0,
                   help="extra physical expert slots holding replicas (experts + R must divide by --ep-size)")
    g.add_argument("--expert-placement", default=None, help="JSON placement file (phy2log per MoE layer)")
    g.add_argument("--ep-dispatcher", default="all_to_all", choices=DISPATCHERS.names(),
                   help="token dispatch/combine backend")
    g.add_argument("--ep-dispatcher-mode", default="auto", choices=["auto", "normal", "low_latency"],
                   help="DeepEP mode (auto: normal for prefill, low_latency for decode)")
    g.add_argument("--ep-low-latency-budget", type=int, default=128,
                   help="DeepEP low-latency mode: most tokens a rank dispatches per step, so most tokens per step "
                        "(at most 1024; its RDMA buffer grows with it: ~1.8 GiB per rank at 128 for DeepSeek-V3)")
    g.add_argument("--ep-gemm", default="torch", choices=GEMMS.names(), help="grouped expert GEMM backend")
    g.add_argument("--enable-tbo", action="store_true",
                   help="two-batch overlap: split each step in two micro-batches, overlapping MoE communication")
    g.add_argument("--eplb-max-staging-mb", type=float, default=256.0,
                   help="a live placement switch stages the moving experts' weights in the background, at most this "
                        "many MiB per rank at once (more moves go in several rounds); at least one expert's weights. "
                        "A bound that holds a rank's whole MoE layer lets each layer switch by a pointer swap (the "
                        "layer staged whole); below it the moved experts are copied in at the step boundary")
    g.add_argument("--eplb-switch-chunk-mb", type=float, default=1.0,
                   help="a live placement switch copies at most this many MiB per rank during one serving step "
                        "(smaller: steps less disturbed, the switch takes longer)")
    g.add_argument("--ep-timeout-s", type=float, default=300.0,
                   help="how long a collective may wait on a peer rank before the group is declared failed")


def ep_config(args: argparse.Namespace) -> EPConfig | None:
    """This process's EP group membership, or None for a plain single-rank worker."""
    if args.ep_size == 1 and not args.enable_tbo and not args.expert_placement:
        return None
    from moemesh.ep.group import EPConfig
    from moemesh.worker.engine_args import device_of

    return EPConfig(
        size=args.ep_size, rank=args.ep_rank if args.ep_rank is not None else args.node_rank,
        init_addr=args.dist_init_addr or free_local_addr(),
        redundant_experts=args.redundant_experts, placement_file=args.expert_placement,
        dispatcher=args.ep_dispatcher, dispatcher_mode=args.ep_dispatcher_mode,
        ll_budget=args.ep_low_latency_budget, gemm=args.ep_gemm,
        enable_tbo=args.enable_tbo, timeout_s=args.ep_timeout_s, device=device_of(args),
        max_staging_mb=args.eplb_max_staging_mb, switch_chunk_mb=args.eplb_switch_chunk_mb)


def validate_ep_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject inconsistent group options at once, with the parser's usage message."""
    if args.ep_size < 1:
        p.error(f"--ep-size must be >= 1, got {args.ep_size}")
    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        p.error(f"--node-rank must be in [0, --nnodes={args.nnodes}), got {args.node_rank}")
    if args.ep_size % args.nnodes:
        p.error(f"--ep-size {args.ep_size} must be a multiple of --nnodes {args.nnodes}")
    if args.ep_rank is not None and not 0 <= args.ep_rank < args.ep_size:
        p.error(f"--ep-rank must be in [0, --ep-size={args.ep_size}), got {args.ep_rank}")
    if args.nnodes > 1 and not args.dist_init_addr:
        p.error("--dist-init-addr (node 0's host:port) is required with --nnodes > 1")
    if args.redundant_experts < 0:
        p.error(f"--redundant-experts must be >= 0, got {args.redundant_experts}")
    if args.eplb_max_staging_mb <= 0 or args.eplb_switch_chunk_mb <= 0:
        p.error("--eplb-max-staging-mb and --eplb-switch-chunk-mb must be > 0")
    if args.ep_low_latency_budget < 1:
        p.error(f"--ep-low-latency-budget must be >= 1, got {args.ep_low_latency_budget}")


def main_of_worker(service: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                   serve: Callable[..., Any]) -> int:
    """`moemesh serve prefill|decode`: one rank here, or this node's ranks as processes."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    validate_ep_arguments(parser, args)
    if needs_launcher(args):
        return launch_ranks(service, argv, args)
    from moemesh.service.server import run_service

    return run_service(serve, args, service)


def needs_launcher(args: argparse.Namespace) -> bool:
    """Whether this process starts rank processes instead of being a rank."""
    return args.ep_rank is None and args.ep_size // args.nnodes > 1


def launch_ranks(service: str, argv: Sequence[str], args: argparse.Namespace) -> int:
    """Start this node's ranks as `moemesh serve SERVICE ... --ep-rank R` processes; wait for all of them.

    SIGINT/SIGTERM are passed on. A rank that dies leaves the others running: they fail their requests,
    report NOT_SERVING and leave the gateway, so health checks see the group down. The exit code is the
    first non-zero one.
    """
    local = args.ep_size // args.nnodes
    addr = args.dist_init_addr or free_local_addr()
    instance = args.instance_id or f"{service}-{uuid.uuid4().hex[:8]}"
    procs: list[subprocess.Popen] = []
    for i in range(local):
        rank = args.node_rank * local + i
        extra = ["--ep-rank", str(rank), "--dist-init-addr", addr, "--instance-id", instance,
                 "--procs-per-host", str(args.procs_per_host * local)]
        for opt, dest in (("--port", "port"), ("--metrics-port", "metrics_port"), ("--kv-port", "kv_port")):
            base = getattr(args, dest, None)
            if base:  # 0 (pick a free one) and absent options stay as they are
                extra += [opt, str(base + i)]
        cmd = [sys.executable, "-m", "moemesh.services.cli.main", "serve", service, *argv, *extra]
        procs.append(subprocess.Popen(cmd))

    def forward(signum: int, frame: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [proc.wait() for proc in procs]
    return next((c for c in codes if c), 0)


def free_local_addr() -> str:
    """host:port of a port free on loopback now (a group's rendezvous on one host)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"
