"""`moemesh bench eplb`: what rebalancing buys on a skewed workload, side by side in one run.

An EP group (rank processes over gloo) serves a model whose routing favours experts that all sit on
rank 0 at start-up. Each rank decodes its batch; the group's expert load is counted; the balancer's
algorithm places the experts again (with redundant slots); the group switches live (one MoE layer per
step boundary, weights over all-to-all); the same decode runs again. Printed: balancedness of each
phase's own traffic, decode tokens/s before and after, and what the switch cost the serving steps: it runs under
load (the moving experts staged in the background, each layer switched at a step boundary), and its steps are
compared with a run of the same load without a switch (longest step, p99 inter-token latency), with the
staging memory it held.

One switch's window is about a hundred steps, and the p99 of a hundred steps is its second slowest: on a shared
machine that is mostly the machine's noise. So the group switches `--switches` times, back and forth (start-up
placement to the balanced one and back), each switch right after a run of the same load without one under the
placement it starts from; the p99 and longest step are taken over the steps of every switch pooled, against every
run without one pooled. Two runs without a switch under the same placement, compared alike, show the noise (A/A).

The file doubles as the rank script: `python -m moemesh.bench.eplb RANK SIZE ADDR CKPT OUT OPTIONS_JSON`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
    p.add_argument("--load-batch", type=int, default=8, help="sequences per rank decoding while the switch runs")
    p.add_argument("--load-steps", type=int, default=120,
                   help="decode steps of the run without a switch (compared step for step with the switch's)")
    p.add_argument("--eplb-max-staging-mb", type=float, default=256.0, help="the switch's staging bound per rank")
    p.add_argument("--eplb-switch-chunk-mb", type=float, default=1.0, help="the switch's copies per rank and step")
    p.add_argument("--switches", type=int, default=3,
                   help="switches under load, back and forth, each after its run without a switch (pooled)")
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

    options = {"batch_sizes": [int(b) for b in args.batch_sizes.split(",")], "decode_steps": args.decode_steps,
               "load_batch": args.load_batch, "load_steps": args.load_steps,
               "max_staging_mb": args.eplb_max_staging_mb, "switch_chunk_mb": args.eplb_switch_chunk_mb,
               "switches": args.switches}
    if args.switches < 1:
        print("moemesh bench eplb: --switches must be >= 1", file=sys.stderr)
        return 2
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
    out.append(f"\n  The switch under load ({args.load_batch} sequences per rank decoding), against the same load "
               f"without a switch; ITL = one decode step; staging bound {args.eplb_max_staging_mb:g} MiB per rank, "
               f"copies {args.eplb_switch_chunk_mb:g} MiB per rank and step; {args.switches} switch(es) back and "
               f"forth, their steps pooled")
    out.append(f"  {'EP':>3} {'moved slots':>11} {'rounds':>6} {'steps':>5} {'normal step ms':>14} "
               f"{'longest ms: no switch':>21} {'switch':>7} {'ratio':>6} {'p99 ITL ms: no switch':>21} "
               f"{'switch':>7} {'ratio':>6} {'staging MiB':>11} {'switch pause ms':>15} {'longest boundary ms':>19}")
    for size, r in results.items():
        ld = r["load"]
        out.append(f"  {size:>3} {r['moved_slots']:>11} {ld['rounds']:>6} {ld['switch_steps']:>5} "
                   f"{ld['normal_step_ms']:>14.1f} {ld['base_max_ms']:>21.1f} {ld['switch_max_ms']:>7.1f} "
                   f"{ld['switch_max_ms'] / ld['normal_step_ms']:>5.2f}x {ld['base_p99_ms']:>21.1f} "
                   f"{ld['switch_p99_ms']:>7.1f} {ld['switch_p99_ms'] / ld['base_p99_ms']:>5.2f}x "
                   f"{ld['staging_mib']:>11.2f} {ld['pause_ms']:>15.1f} {ld['longest_boundary_ms']:>19.1f}")
    for size, r in results.items():
        ld = r["load"]
        each = ", ".join(f"{t['p99_ratio']:.2f}x" for t in ld["per_switch"])
        line = f"  EP {size}: p99 ITL of each switch against its own run without one: {each}"
        if ld["aa_p99_ratios"]:
            line += (f"; the runs without a switch against each other (same placement, same steps): "
                     f"{', '.join(f'{x:.2f}x' for x in ld['aa_p99_ratios'])}")
        out.append(line)
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
    group = EPGroup(EPConfig(size=size, rank=rank, init_addr=addr, redundant_experts=size,
                             max_staging_mb=options["max_staging_mb"], switch_chunk_mb=options["switch_chunk_mb"]))
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
    trials = []  # (steps without a switch, steps of the switch's run, its window, its staging figures)
    tps_after: dict[int, float] = {}
    for k in range(options["switches"]):
        target = new if k % 2 == 0 else old
        base, _ = _under_load(engine, group, options["load_batch"], options["load_steps"], None)
        during, window = _under_load(engine, group, options["load_batch"], 0, target)
        staging = torch.tensor([group.last_staging_bytes, group.last_switch_s * 1e9,
                                group.last_switch_longest_s * 1e9, group.last_switch_rounds], dtype=torch.float64)
        dist.all_reduce(staging, op=dist.ReduceOp.MAX)
        trials.append((base, during, window, staging.tolist()))
        if k == 0:
            tps_after, load_after = phase()
    if rank == 0:
        Path(out).write_text(json.dumps({
            "num_physical": group.placement.num_physical,
            "balancedness_before": float(balancedness(load_before, old, size).mean()),
            "balancedness_after": float(balancedness(load_after, new, size).mean()),
            "decode_tok_s": {b: (tps_before[b], tps_after[b]) for b in options["batch_sizes"]},
            "moved_slots": int(moved_slots(old, new).sum()), "pause_s": trials[0][3][1] / 1e9,
            "max_step_s": max(max(t[1][t[2][0]:t[2][1]]) for t in trials),
            "load": _load_figures(trials)}))
    group.barrier()
    group.close()


def _load_figures(trials: list[tuple[list[float], list[float], tuple[int, int], list[float]]]) -> dict[str, Any]:
    """The switches' steps against the runs without a switch, each over its switch's window (the same steps, so the
    same context lengths: a step slows as they grow), pooled; per switch; and A/A (trial k+2's run without a switch
    against trial k's: the same placement)."""
    pooled_switch: list[float] = []
    pooled_base: list[float] = []
    per_switch = []
    for base, during, (lo, hi), (staging, held, longest, rounds) in trials:
        steps, same = during[lo:hi], base[lo:min(hi, len(base))] or base  # a run shorter than the window: all of it
        pooled_switch += steps
        pooled_base += same
        per_switch.append({"steps": len(steps), "base_p99_ms": 1e3 * _p99(same), "switch_p99_ms": 1e3 * _p99(steps),
                           "p99_ratio": _p99(steps) / _p99(same), "max_ratio": max(steps) / statistics.median(same),
                           "rounds": int(rounds), "staging_mib": staging / (1 << 20), "pause_ms": held / 1e6,
                           "longest_boundary_ms": longest / 1e6})
    aa = []
    for k in range(len(trials) - 2):
        lo, hi = trials[k][2]
        a, b = trials[k][0][lo:hi], trials[k + 2][0][lo:hi]
        if a and b:
            aa.append(_p99(b) / _p99(a))
    return {"switches": len(trials), "rounds": per_switch[0]["rounds"], "switch_steps": len(pooled_switch),
            "normal_step_ms": 1e3 * statistics.median(pooled_base), "base_max_ms": 1e3 * max(pooled_base),
            "switch_max_ms": 1e3 * max(pooled_switch), "base_p99_ms": 1e3 * _p99(pooled_base),
            "switch_p99_ms": 1e3 * _p99(pooled_switch),
            "staging_mib": max(t["staging_mib"] for t in per_switch),
            "pause_ms": max(t["pause_ms"] for t in per_switch),
            "longest_boundary_ms": max(t["longest_boundary_ms"] for t in per_switch),
            "per_switch": per_switch, "aa_p99_ratios": aa,
            "trials": [{"base_steps_s": b, "switch_run_steps_s": d, "switch_window": list(w)}
                       for b, d, w, _ in trials]}


def _under_load(engine: Any, group: Any, batch: int, steps: int, new: Any) -> tuple[list[float], tuple[int, int]]:
    """Decode `batch` sequences per rank as the worker's step loop does (vote, advance, execute), timing each step
    (the slowest rank's: the group steps together). With `new` (phy2log [L, P]) the placement is offered at the
    fifth step and the run lasts until the switch is done plus five steps; else `steps` steps. Returns the step
    times in seconds and the switch's window [offered, done] as step indexes."""
    import torch
    import torch.distributed as dist

    from moemesh.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=100_000, temperature=0, ignore_eos=True)
    ids = [engine.add_request([(11 * i + j) % 1000 + 1 for j in range(32)], params) for i in range(batch)]
    while group.vote(any(engine.requests[i].num_output_tokens == 0 for i in ids), True, False).any_batch:
        b = engine.schedule()
        group.vote(b is not None, True, False)
        engine.execute(b)
    version = group.placement_version
    times: list[float] = []
    window = [0, 0]
    while True:
        t0 = time.perf_counter()
        if new is not None and len(times) == 4:
            group.offer(version + 1, new)
            window[0] = len(times)
        b = engine.schedule()
        vote = group.vote(b is not None, engine.can_split(b), False)
        group.advance(vote)
        engine.execute(b)
        times.append(time.perf_counter() - t0)
        if new is not None and not window[1] and group.placement_version > version:
            window[1] = len(times)
        if (new is None and len(times) >= steps) or (window[1] and len(times) >= window[1] + 5):
            break
    for i in ids:
        engine.abort(i)
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.tolist(), (window[0], window[1])


def _p99(times: list[float]) -> float:
    """The 99th percentile (linear interpolation between the closest ranks)."""
    ordered = sorted(times)
    pos = 0.99 * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


if __name__ == "__main__":
    _r, _s, _addr, _ckpt, _out, _opts = sys.argv[1:7]
    _rank(int(_r), int(_s), _addr, _ckpt, _out, json.loads(_opts))
