"""`moemesh serve NAME ...`: run one service alone (how containers and Kubernetes run the mesh)."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> what it is, for `moemesh serve --help`.
SERVICES = {
    "gateway": "the mesh's entry: gRPC Gateway API and OpenAI-compatible REST, worker registry, router",
    "prefill": "one prefill worker (or one rank of an EP group: --ep-size)",
    "decode": "one decode worker (or one rank of an EP group: --ep-size)",
    "kvtransfer": "the KV handoff's rendezvous between prefill and decode workers, and its relay data plane",
    "eplb": "the expert-parallel load balancer (expert placements from the ranks' load reports)",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    # No argparse help: `--help` after NAME belongs to the service (its own parser prints its options); before
    # NAME, or alone, it is this command's and handled in `run`.
    p = sub.add_parser("serve", help="run one service", add_help=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run one service of the mesh in this process. Every option of a service can "
                                   "also be set as a\nMOEMESH_<OPTION> environment variable (--kv-cache-mb: "
                                   "MOEMESH_KV_CACHE_MB); a flag wins over the variable.",
                       epilog="services:\n" + "".join(f"  {name:<11} {what}\n" for name, what in SERVICES.items())
                              + "\n`moemesh serve NAME --help` lists the options of service NAME.")
    p.add_argument("-h", "--help", action="store_true", help="show this help (or, after NAME, the service's)")
    p.add_argument("service", nargs="?", default=None, metavar="NAME", help=f"one of: {', '.join(SERVICES)}")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="OPTIONS", help="the service's options")
    p.set_defaults(func=run, _serve_parser=p)


def run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args._serve_parser
    if args.service is None:
        if args.help:
            parser.print_help()
            return 0
        parser.print_usage(sys.stderr)
        print(f"moemesh serve: error: name a service: {', '.join(SERVICES)} (`moemesh serve --help` says more)",
              file=sys.stderr)
        return 2
    if args.service not in SERVICES:
        parser.print_usage(sys.stderr)
        print(f"moemesh serve: error: no service {args.service!r}; choose from {', '.join(SERVICES)}",
              file=sys.stderr)
        return 2
    # `moemesh serve --help gateway` means the gateway's help, as `moemesh serve gateway --help` does.
    service_args = ["--help"] if args.help else args.args
    # Imported only when chosen: a gateway container never loads torch.
    module = importlib.import_module(f"moemesh.services.{args.service}.serve")
    return int(module.main(service_args) or 0)
