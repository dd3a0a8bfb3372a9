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
    p.add_argument("--ucx-host", default=None, help="address the UCX receiver listens on (default: --host)")
    p.add_argument("--ucx-port", type=int, default=0, help="UCX receiver port (0 picks a free one)")
    p.add_argument("--kv-lease-ms", type=int, default=60_000, help="how long a KV handoff may take at most")
    apply_env_defaults(p)
    return p


async def serve(args: argparse.Namespace, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    from moemesh.services.decode.servicer import DecodeServicer
    from moemesh.transfer.registry import make_receiver

    def receiver() -> KvReceiver:
        if args.transfer == "ucx":
            # UCX listens on every interface; the host is the name peers reach it by.
            host = args.ucx_host or advertised(args, 0).rsplit(":", 1)[0]
            return make_receiver("ucx", host=host, port=args.ucx_port)
        if args.transfer == "relay":
            return make_receiver("relay", target=args.kvtransfer)
        return make_receiver(args.transfer)

    servicer = DecodeServicer(receiver, args.kv_lease_ms)
    await run_worker(common_pb2.WORKER_ROLE_DECODE, "decode", args, servicer,
                     decode_pb2_grpc.add_DecodeServicer_to_server, "moemesh.v1.Decode", ready, stop)


def main(argv: Sequence[str] | None = None) -> int:
    return main_of_worker("decode", build_parser(), argv, serve)


if __name__ == "__main__":
    sys.exit(main())
