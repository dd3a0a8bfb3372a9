"""`moemesh serve decode`: one decode worker."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from moemesh.service.config import apply_env_defaults
from moemesh.transfer.base import KvReceiver
from moemesh.v1 import common_pb2, decode_pb2_grpc
from moemesh.worker.ep_args import main_of_worker
from moemesh.worker.runtime import add_worker_arguments, advertised, run_worker

DEFAULT_PORT = 50070
DEFAULT_METRICS_PORT = 9105


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moemesh serve decode", description="Run one decode worker.")
    add_worker_arguments(p, DEFAULT_PORT, DEFAULT_METRICS_PORT)
    p.add_argument("--kv-host", "--ucx-host", dest="kv_host", default=None,
                   help="KV data plane (tcp, ucx): tcp listens on this address (default: --host) and peers dial "
                        "--advertise-host or it; UCX listens on every interface and peers dial this name")
    p.add_argument("--kv-port", "--ucx-port", dest="kv_port", type=int, default=0,
                   help="KV data plane port, tcp or ucx (0 picks a free one)")
    p.add_argument("--kv-lease-ms", type=int, default=60_000, help="how long a KV handoff may take at most")
    apply_env_defaults(p)
    return p


async def serve(args: argparse.Namespace, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    from moemesh.services.decode.servicer import DecodeServicer
    from moemesh.transfer.registry import make_receiver

    def receiver() -> KvReceiver:
        if args.transfer == "tcp":
            host = args.kv_host or args.host
            reach = argparse.Namespace(advertise_host=args.advertise_host, host=host)
            return make_receiver("tcp", host=host, port=args.kv_port, advertise_host=_host_of(reach))
        if args.transfer == "ucx":
            # UCX listens on every interface; the host is the name peers reach it by.
            return make_receiver("ucx", host=args.kv_host or _host_of(args), port=args.kv_port)
        if args.transfer == "relay":
            return make_receiver("relay", target=args.kvtransfer)
        return make_receiver(args.transfer)

    servicer = DecodeServicer(receiver, args.kv_lease_ms)
    await run_worker(common_pb2.WORKER_ROLE_DECODE, "decode", args, servicer,
                     decode_pb2_grpc.add_DecodeServicer_to_server, "moemesh.v1.Decode", ready, stop)


def _host_of(args: argparse.Namespace) -> str:
    """The host peers dial for a listener bound to args.host (advertise_host when set)."""
    return advertised(args, 0).rsplit(":", 1)[0]


def main(argv: Sequence[str] | None = None) -> int:
    return main_of_worker("decode", build_parser(), argv, serve)


if __name__ == "__main__":
    sys.exit(main())
