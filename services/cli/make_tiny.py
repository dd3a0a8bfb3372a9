"""`moemesh make-tiny`: write the embedded tiny random DeepSeek-V3 checkpoint to a folder."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny", help="write a tiny random DeepSeek-V3 checkpoint (Hugging Face format)")
    p.add_argument("dir", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="tiny", choices=["tiny", "bench"],
                   help="tiny: the embedded default; bench: a larger, compute-bound config")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moemesh.model.tiny import make_tiny

    out = make_tiny(args.dir, seed=args.seed, preset=args.preset)
    print(f"wrote a {args.preset} DeepSeek-V3 checkpoint to {out}")
    return 0
