"""`moemesh bench eplb-policy`: the refined EPLB policy against DeepSeek's on the same loads, and what each costs.

(a) Skewed synthetic loads shaped like real ones (`synthetic_loads`): per layer a Zipf-like expert popularity, a few
hot experts on top, and the popularity drifting from one layer to the next; at a prefill-like EP 32 (256 experts +
32 redundant, 4 nodes: the hierarchical policies) and a decode-like EP 72 (256 + 32, 9 nodes: 8 groups do not divide
over 9 nodes, so the global policies). (b) Loads recorded with `--record-expert-load` (`--stats FILE`), each window
a load of its own, at the topologies of `--stats-topologies`.

Printed per case: the balancedness (mean over max per-rank load, averaged over layers; 1.0 is even) of DeepSeek's
policy ("auto") and of "refined", the gain, the smallest gain of any layer (never below 0 by construction) and each
policy's run time (best of `--repeats`, after a warm-up run).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where used: `moemesh --help` builds this parser without it
    import torch

# (a)'s cases: name, EP ranks R, nodes N; DeepSeek-V3's 256 experts in 8 groups, 32 redundant slots.
SYNTHETIC_CASES = (("prefill-like EP 32", 32, 4), ("decode-like EP 72", 72, 9))
NUM_GROUPS = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=61, help="MoE layers of the synthetic loads (DeepSeek-V3: 58)")
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--redundant", type=int, default=32)
    p.add_argument("--zipf", type=float, default=0.8, help="Zipf exponent of expert popularity within a layer")
    p.add_argument("--hot", type=int, default=3, help="hot experts per layer, on top of the Zipf popularity")
    p.add_argument("--hot-factor", type=float, default=3.0, help="how much more a hot expert gets")
    p.add_argument("--drift", type=float, default=0.3,
                   help="layer-to-layer drift of popularity (std of a log-popularity step)")
    p.add_argument("--seeds", type=int, default=3, help="synthetic load draws per case")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per policy (the best is kept)")
    p.add_argument("--stats", default=None, metavar="FILE.jsonl",
                   help="also compare on loads recorded with --record-expert-load (each window one load)")
    p.add_argument("--stats-groups", type=int, default=1, metavar="G", help="expert groups of the recorded model")
    p.add_argument("--stats-topologies", default="4:2:4,8:1:8", metavar="R:N:REDUNDANT,...",
                   help="EP ranks, nodes and redundant slots to place the recorded loads on")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")


def synthetic_loads(num_layers: int, num_experts: int, seed: int, zipf: float = 0.8, hot: int = 3,
                    hot_factor: float = 3.0, drift: float = 0.3, tokens: int = 65536) -> torch.Tensor:
    """[L, E] float64 tokens per (layer, expert), `tokens` per layer.

    Every layer has the same Zipf-like popularity curve (rank k gets k^-zipf), but which expert holds which rank
    drifts: each layer's ranking sorts the previous layer's log-popularity plus a normal step of std `drift`.
    `hot` experts drawn anew per layer get `hot_factor` times their share, and every count a 10% log-normal noise.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    curve = torch.arange(1, num_experts + 1, dtype=torch.float64) ** -zipf
    position = torch.randn(num_experts, generator=g, dtype=torch.float64)
    rows = []
    for _ in range(num_layers):
        position = position + drift * torch.randn(num_experts, generator=g, dtype=torch.float64)
        share = torch.empty(num_experts, dtype=torch.float64)
        share[position.argsort(descending=True)] = curve
        share[torch.randperm(num_experts, generator=g)[:hot]] *= hot_factor
        share *= torch.exp(0.1 * torch.randn(num_experts, generator=g, dtype=torch.float64))
        rows.append((tokens * share / share.sum()).round())
    return torch.stack(rows)


def compare(weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_ranks: int,
            repeats: int) -> dict[str, Any]:
    """Both policies on weight [L, E]: balancedness per layer, their means, and the best run time of each."""
    from moemesh.services.eplb.balance import balancedness
    from moemesh.services.eplb.rebalance import rebalance, resolve_policy

    out: dict[str, Any] = {"policies": {}}
    for policy in ("auto", "refined"):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            phy2log = rebalance(weight, num_physical, num_groups, num_nodes, num_ranks, policy).phy2log
            times.append(time.perf_counter() - t0)
        layers = balancedness(weight, phy2log, num_ranks)
        out["policies"][policy] = {"resolved": resolve_policy(policy, num_groups, num_nodes),
                                   "layers": layers.tolist(), "mean": float(layers.mean()), "time_s": min(times)}
    gains = [r - a for r, a in zip(out["policies"]["refined"]["layers"], out["policies"]["auto"]["layers"],
                                   strict=True)]
    out.update(gain=sum(gains) / len(gains), min_layer_gain=min(gains), layers=len(gains),
               better_layers=sum(g > 0 for g in gains), worse_layers=sum(g < 0 for g in gains))
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    num_physical = args.experts + args.redundant
    # A warm-up run: the first torch calls of a process pay one-off costs that a running balancer has paid long ago.
    compare(synthetic_loads(2, args.experts, 0), num_physical, NUM_GROUPS, 4, 32, 1)
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "synthetic": [], "recorded": []}
    for name, ranks, nodes in SYNTHETIC_CASES:
        for seed in range(args.seeds):
            weight = synthetic_loads(args.layers, args.experts, seed, args.zipf, args.hot, args.hot_factor,
                                     args.drift)
            row = compare(weight, num_physical, NUM_GROUPS, nodes, ranks, args.repeats)
            results["synthetic"].append({"case": name, "seed": seed, "ranks": ranks, "nodes": nodes, **row})
    if args.stats:
        results["recorded"] = _recorded(args)
    print(_report(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def _recorded(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from moemesh.telemetry.expert_load_file import read_windows

    windows = read_windows(args.stats)
    weight = torch.cat([w.counts.double() for w in windows])  # [windows x L, E]: each window's layers
    rows = []
    for topology in args.stats_topologies.split(","):
        ranks, nodes, redundant = (int(x) for x in topology.split(":"))
        row = compare(weight, weight.shape[1] + redundant, args.stats_groups, nodes, ranks, args.repeats)
        rows.append({"ranks": ranks, "nodes": nodes, "redundant": redundant, "windows": len(windows), **row})
    return rows


def _report(results: dict[str, Any], args: argparse.Namespace) -> str:
    head = (f"  {'case':<26} {'policies':<36} {'DeepSeek':>8} {'refined':>8} {'gain':>7} {'min layer':>9} "
            f"{'worse':>5} {'DeepSeek ms':>11} {'refined ms':>10}")
    out = [f"moemesh bench eplb-policy: DeepSeek's EPLB (auto) against refined, same loads and constraints; "
           f"torch threads {results['threads']}",
           f"\n(a) synthetic: {args.layers} MoE layers x {args.experts} experts + {args.redundant} redundant, "
           f"{NUM_GROUPS} groups; Zipf {args.zipf}, {args.hot} hot experts x{args.hot_factor}, drift {args.drift}",
           head]
    out += [_line(f"{r['case']} seed {r['seed']}", r) for r in results["synthetic"]]
    for name, _, _ in SYNTHETIC_CASES:
        rows = [r for r in results["synthetic"] if r["case"] == name]
        out.append(f"  {name}: mean gain {sum(r['gain'] for r in rows) / len(rows):+.4f}, "
                   f"worst layer {min(r['min_layer_gain'] for r in rows):+.4f}")
    gains = [r["gain"] for r in results["synthetic"]]
    out.append(f"  all of (a): mean gain {sum(gains) / len(gains):+.4f}")
    if results["recorded"]:
        out += [f"\n(b) recorded: {args.stats}, {results['recorded'][0]['windows']} windows, each a load; "
                f"{args.stats_groups} groups", head]
        out += [_line(f"R {r['ranks']} N {r['nodes']} +{r['redundant']}", r) for r in results["recorded"]]
    return "\n".join(out)


def _line(case: str, r: dict[str, Any]) -> str:
    auto, refined = r["policies"]["auto"], r["policies"]["refined"]
    policy = f"{auto['resolved']} / {refined['resolved']}"
    return (f"  {case:<26} {policy:<36} {auto['mean']:>8.4f} {refined['mean']:>8.4f} {r['gain']:>+7.4f} "
            f"{r['min_layer_gain']:>+9.4f} {r['worse_layers']:>5} {1e3 * auto['time_s']:>11.1f} "
            f"{1e3 * refined['time_s']:>10.1f}")
