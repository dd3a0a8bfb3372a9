"""`moemesh serve NAME ...`: run one service alone (how containers and Kubernetes run the mesh)."""

from __future__ import annotations

import argparse
import importlib

SERVICES = ("gateway", "prefill", "decode", "kvtransfer", "eplb")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run one service", add_help=False,
                       description="Run one service; `moemesh serve NAME --help` lists its options, each also "
                                   "settable as a MOEMESH_<OPTION> environment variable.")
    p.add_argument("service", choices=SERVICES)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported only when chosen: a gateway container never loads torch.
    module = importlib.import_module(f"moemesh.services.{args.service}.serve")
    return int(module.main(args.args) or 0)
