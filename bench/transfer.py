"""KV transfer GB/s and latency per data plane against a plain memory copy, in one run.

The relay goes through a real kvtransfer process on loopback; UCX and in-process move the rows inside
this process (UCX over its TCP/shared-memory transports on a CPU host).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import torch

from moemesh.model.config import ModelConfig
from moemesh.service.launch import start_service


def run(args: argparse.Namespace) -> int:
    from moemesh.bench.transfer_planes import bench
    from moemesh.model.default import default_model_dir

    cfg = ModelConfig.from_dir(args.model or default_model_dir())
    layers, width = cfg.num_hidden_layers, cfg.kv_cache_dim
    cases = {f"{args.prompt_tokens}-token prompt": args.prompt_tokens,
             "64 MB": 64 * 2**20 // (layers * width * 4)}
    planes = [p for p in args.planes.split(",") if p]
    # The relay's kvtransfer: a real process, waited for until it listens (its output in the error if it does not).
    kvtransfer = start_service("kvtransfer", ["--port", "0"]) if "relay" in planes else None
    target = kvtransfer.address if kvtransfer is not None else None
    print(f"rows: {layers} layers x {width} floats per token, float32; median of {args.repeats} rooms", flush=True)
    results = []
    try:
        for name, tokens in cases.items():
            rows = torch.randn(layers, tokens, width)
            base, *found = asyncio.run(bench(rows, planes, relay_target=target, repeats=args.repeats))
            print(f"{name} ({rows.numel() * 4 / 2**20:.1f} MiB):", flush=True)
            for r in [base, *found]:
                print(f"  {r}   {r.gbps / base.gbps * 100:6.2f}% of memcpy", flush=True)
                results.append({"case": name, "plane": r.plane, "bytes": r.nbytes, "gb_s": r.gbps,
                                "latency_us": r.latency_s * 1e6, "vs_memcpy": r.gbps / base.gbps})
    finally:
        if kvtransfer is not None:
            kvtransfer.stop(10)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0
