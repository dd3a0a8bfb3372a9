"""`moemesh serve prefill`: one prefill worker."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from moemesh.service.config import apply_env_defaults
from moemesh.transfer.base import KvSender
from moemesh.v1 import common_pb2, prefill_pb2_grpc
from moemesh.worker.ep_args import main_of_worker
from moemesh.worker.runtime import add_worker_arguments, run_worker

DEFAULT_PORT = 50080
DEFAULT_METRICS_PORT = 9104


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moemesh serve prefill", description="Run one prefill worker.")
    add_worker_arguments(p, DEFAULT_PORT, DEFAULT_METRICS_PORT)
    p.add_argument("--kv-wait-ms", type=int, default=30_000,
                   help="how long to wait for the decode worker to register its receiver")
    p.add_argument("--kv-lease-ms", type=int, default=60_000, help="how long a KV handoff may take at most")
    apply_env_defaults(p)
    return p


async def serve(args: argparse.Namespace, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    from moemesh.services.prefill.servicer import PrefillServicer
    from moemesh.transfer.registry import make_sender

    def sender(plane: str) -> KvSender:
        return make_sender(plane, target=args.kvtransfer) if plane == "relay" else make_sender(plane)

    servicer = PrefillServicer(sender, args.kv_wait_ms, args.kv_lease_ms)
    await run_worker(common_pb2.WORKER_ROLE_PREFILL, "prefill", args, servicer,
                     prefill_pb2_grpc.add_PrefillServicer_to_server, "moemesh.v1.Prefill", ready, stop)


def main(argv: Sequence[str] | None = None) -> int:
    return main_of_worker("prefill", build_parser(), argv, serve)


if __name__ == "__main__":
    sys.exit(main())
