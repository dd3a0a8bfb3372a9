"""`moemesh bench eplb`: what rebalancing buys on a skewed workload, side by side in one run.

An EP group (rank processes over gloo) serves a model whose routing favours experts that all sit on
rank 0 at start-up. Each rank decodes its batch; the group's expert load is counted; the balancer's
algorithm places the experts again (with redundant slots); the group switches live (one MoE layer per
step boundary, weights over all-to-all); the same decode runs again. Printed: balancedness of each
phase's own traffic, decode tokens/s before and after, and the pause the switch cost.

The file doubles as the rank script: `python -m moemesh.bench.eplb RANK SIZE ADDR CKPT OUT OPTIONS_JSON`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ep-sizes", default="2,4")
    p.add_argument("--preset", default="bench", help="model preset (tiny, bench)")
    p.add_argument("--favoured", type=int, default=4, help="experts the skewed routing favours (all on rank 0)")
    p.add_argument("--bias", type=float, default=0.3, help="routing bias added to the favoured experts")
    p.add_argument("--batch-sizes", default="8,32", help="sequences per rank in the decode timings")
    p.add_argument("--decode-steps", type=int, default=12)
    p.add_argument("--json", default=None, metavar="FILE")


def skewed_checkpoint(out: Path, preset: str, favoured: int, bias: float) -> Path:
    """A preset checkpoint whose routing bias favours experts 0..favoured-1."""
    from safetensors.torch import load_file, save_file

    from moemesh.model.tiny import tiny_config, write_checkpoint

    path = write_checkpoint(out, tiny_config(preset), seed=0)
    weights = load_file(path / "model.safetensors")
    for name, t in weights.items():
        if name.endswith("e_score_correction_bias"):
            t[:favoured] += bias
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def run(args: argparse.Namespace) -> int:
    from moemesh.bench.ep import run_group

    options = {"batch_sizes": [int(b) for b in args.batch_sizes.split(",")], "decode_steps": args.decode_steps}
    results: dict[int, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = skewed_checkpoint(Path(tmp) / "model", args.preset, args.favoured, args.bias)
        for size in (int(s) for s in args.ep_sizes.split(",")):
            result = run_group("moemesh.bench.eplb", size, ckpt, Path(tmp) / f"ep{size}.json", options)
            if result is None:
                return 1
            results[size] = result
    print(_report(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def _report(results: dict[int, Any], args: argparse.Namespace) -> str:
    out = [f"moemesh bench eplb: preset {args.preset!r}, experts 0..{args.favoured - 1} favoured by a routing "
           f"bias of {args.bias} (all on rank 0 at start-up), EP groups over gloo on this machine",
           f"\n  {'EP':>3} {'slots':>5} {'balancedness':>19} {'seqs/rank':>9} {'tok/s before':>12} "
           f"{'after':>9} {'ratio':>7}"]
    for size, r in results.items():
        bal = f"{r['balancedness_before']:.3f} -> {r['balancedness_after']:.3f}"
        for b, (before, after) in r["decode_tok_s"].items():
            out.append(f"  {size:>3} {r['num_physical']:>5} {bal:>19} {b:>9} {before:>12.1f} {after:>9.1f} "
                       f"{after / before:>6.2f}x")
    out.append(f"\n  {'EP':>3} {'moved slots':>11} {'switch pause, total ms':>22} {'longest step ms':>15}")
    for size, r in results.items():
        out.append(f"  {size:>3} {r['moved_slots']:>11} {1e3 * r['pause_s']:>22.1f} {1e3 * r['max_step_s']:>15.1f}")
    return "\n".join(out)


# ---- one rank ----------------------------------------------------------------------------------------------------

def _rank(rank: int, size: int, addr: str, ckpt: str, out: str, options: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    from moemesh.bench.ep import _decode_tok_s
    from moemesh.engine.engine import Engine, EngineConfig
    from moemesh.ep.group import EPConfig, EPGroup
    from moemesh.services.eplb.balance import balancedness, moved_slots
    from moemesh.services.eplb.rebalance import rebalance

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    group = EPGroup(EPConfig(size=size, rank=rank, init_addr=addr, redundant_experts=size))
    engine = Engine(EngineConfig(model=ckpt, dtype="float32", kv_cache_mb=256, max_num_seqs=256), ep=group)
    recorder = engine.expert_load

    def phase() -> tuple[dict[int, float], torch.Tensor]:
        recorder.reset()
        tps = {b: _decode_tok_s(engine, group, b, options["decode_steps"], split=False)
               for b in options["batch_sizes"]}
        load = recorder.counts.clone()
        dist.all_reduce(load)
        return tps, load

    phase()  # warm-up: first-call costs must not count against the placement before
    tps_before, load_before = phase()
    old = group.placement.phy2log.clone()
    cfg = engine.model.config
    new = rebalance(load_before, group.placement.num_physical, cfg.n_group or 1, 1, size, previous=old).phy2log
    group.offer(1, new)
    pause, longest = 0.0, 0.0
    while group.placement_version < 1:
        t0 = time.perf_counter()
        group.advance(group.vote(False, True, False))
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        pause, longest = pause + float(dt), max(longest, float(dt))
    tps_after, load_after = phase()
    if rank == 0:
        Path(out).write_text(json.dumps({
            "num_physical": group.placement.num_physical,
            "balancedness_before": float(balancedness(load_before, old, size).mean()),
            "balancedness_after": float(balancedness(load_after, new, size).mean()),
            "decode_tok_s": {b: (tps_before[b], tps_after[b]) for b in options["batch_sizes"]},
            "moved_slots": int(moved_slots(old, new).sum()), "pause_s": pause, "max_step_s": longest}))
    group.barrier()
    group.close()


if __name__ == "__main__":
    _r, _s, _addr, _ckpt, _out, _opts = sys.argv[1:7]
    _rank(int(_r), int(_s), _addr, _ckpt, _out, json.loads(_opts))
