"""`moemesh make-tiny`: write the embedded tiny random DeepSeek-V3 checkpoint to a folder."""

from __future__ import annotations

import argparse

PRESETS = ("tiny", "bench", "small", "compute", "v3-layer")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny", help="write a tiny random DeepSeek-V3 checkpoint (Hugging Face format)")
    p.add_argument("dir", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    # Spelled out: importing moemesh.model.tiny would import torch for every `moemesh --help`
    # (tests/unit/test_registry.py checks the list against PRESETS).
    p.add_argument("--preset", default="tiny", choices=PRESETS,
                   help="tiny: the embedded default; bench: a larger, compute-bound config; small and compute: "
                        "the shapes of the comparison with vLLM (docs/benchmarks.md); v3-layer: DeepSeek-V3's "
                        "real layer dimensions, 1 dense + 1 MoE layer, FP8 blocks (~12 GB, written in shards)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the weights' dtype in the files (and config.json's torch_dtype)")
    p.add_argument("--chat-tokens", action="store_true",
                   help="give the tokenizer DeepSeek's chat tokens (<think>, </think>, the tool-call and tool-output "
                        "markers) as its last ids: tool calls and reasoning are then parsed, and tool_choice "
                        "required or named can force calls")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from moemesh.model.tiny import make_tiny

    out = make_tiny(args.dir, seed=args.seed, preset=args.preset, dtype=getattr(torch, args.dtype),
                    chat_tokens=args.chat_tokens)
    print(f"wrote a {args.preset} DeepSeek-V3 checkpoint to {out}")
    return 0
