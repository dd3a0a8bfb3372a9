"""`moemesh eplb ...`: the expert-parallel load balancer offline.

`eplb rebalance` turns a load per (MoE layer, logical expert) into a placement file that `--expert-placement`
reads; `eplb simulate` replays loads recorded with `--record-expert-load` for several redundant slot counts.
Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from moemesh.services.eplb.policies import DEFAULT as DEFAULT_POLICY
from moemesh.services.eplb.policies import POLICIES

if TYPE_CHECKING:
    import torch

EXIT_USAGE = 2
POLICY_HELP = ("refined (the default): DeepSeek's EPLB improved by local search, never worse on any layer; auto, "
               "hierarchical, global: DeepSeek's own; auto and refined are hierarchical when the groups divide evenly "
               "over the nodes, else global")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eplb", help="expert-parallel load balancer: rebalance a load, replay recorded loads",
                       description="Compute expert placements (DeepSeek's EPLB: redundant experts, hierarchical "
                                   "and global policies) and study recorded expert loads offline.")
    esub = p.add_subparsers(dest="eplb", required=True, metavar="ACTION")

    r = esub.add_parser("rebalance", help="a placement that balances a given expert load",
                        description="Rebalance a load per (MoE layer, logical expert) onto P physical slots over "
                                    "R ranks; print phy2log, log2phy, logcnt and the balancedness (mean over max "
                                    "per-rank load, 1.0 is perfect) of the trivial placement and the new one.")
    r.add_argument("--weights", required=True, metavar="FILE.json",
                   help='load per MoE layer and logical expert: {"weight": [[...], ...]} or a bare [[...], ...]')
    _add_topology(r)
    r.add_argument("--num-physical", type=int, required=True, metavar="P",
                   help="physical expert slots per layer (logical experts + redundant), a multiple of R")
    r.add_argument("--policy", choices=POLICIES.names(), default=DEFAULT_POLICY, help=POLICY_HELP)
    r.add_argument("--previous", default=None, metavar="PLACEMENT.json",
                   help="the placement in use: keep it where it balances about as well (--tolerance), otherwise "
                        "permute the new one so that as few expert weights as possible move")
    r.add_argument("--tolerance", type=float, default=0.01,
                   help="relative balancedness a layer may give up to keep --previous as it is (default 0.01)")
    r.add_argument("--out", default=None, metavar="PLACEMENT.json",
                   help="write the placement as a file for --expert-placement")
    r.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    r.set_defaults(func=run_rebalance)

    s = esub.add_parser("simulate", help="replay recorded expert loads for several redundant slot counts",
                        description="Rebalance from the first half of the recorded windows and measure the "
                                    "balancedness of the second half, against the trivial placement and an oracle "
                                    "rebalanced on the second half itself, for each redundant slot count.")
    s.add_argument("--stats", required=True, metavar="FILE.jsonl", help="a --record-expert-load file")
    s.add_argument("--role", choices=("decode", "prefill", "all"), default="decode",
                   help="which workers' windows to replay (default decode)")
    _add_topology(s)
    s.add_argument("--redundant", default="0,8,16,32", metavar="N,N,...",
                   help="redundant slot counts to try (default 0,8,16,32)")
    s.add_argument("--policy", choices=POLICIES.names(), default=DEFAULT_POLICY, help=POLICY_HELP)
    s.add_argument("--png", default=None, metavar="OUT.png", help="also draw the results (needs matplotlib)")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    s.set_defaults(func=run_simulate)


def _add_topology(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-ranks", type=int, required=True, metavar="R", help="EP ranks (GPUs)")
    p.add_argument("--num-groups", type=int, required=True, metavar="G",
                   help="expert groups (n_group of DeepSeek-V3), dividing the logical experts")
    p.add_argument("--num-nodes", type=int, required=True, metavar="N",
                   help="nodes (the ranks of one node share a fast interconnect), dividing R")


def run_rebalance(args: argparse.Namespace) -> int:
    from moemesh.ep.placement import ExpertPlacement
    from moemesh.services.eplb.balance import balancedness
    from moemesh.services.eplb.rebalance import is_hierarchical, minimize_moves, rebalance, resolve_policy

    try:
        weight = read_weights(args.weights)
        num_layers, num_logical = weight.shape
        new = rebalance(weight, args.num_physical, args.num_groups, args.num_nodes, args.num_ranks, args.policy)
        policy = resolve_policy(args.policy, args.num_groups, args.num_nodes)
        report = previous = None
        if args.previous is not None:
            previous = ExpertPlacement.from_file(args.previous, num_logical)
            if (previous.num_layers, previous.num_physical, previous.ep_size) != (
                    num_layers, args.num_physical, args.num_ranks):
                raise ValueError(f"{args.previous}: holds {previous.num_layers} layers x {previous.num_physical} "
                                 f"slots on {previous.ep_size} ranks; this rebalance is {num_layers} x "
                                 f"{args.num_physical} on {args.num_ranks}")
            report = minimize_moves(weight, new.phy2log, previous.phy2log, args.num_ranks,
                                    args.num_nodes if is_hierarchical(policy) else 1, args.tolerance)
        placement = ExpertPlacement(report.phy2log if report else new.phy2log, args.num_ranks, num_logical)
        trivial = ExpertPlacement.default(num_layers, num_logical, args.num_ranks, args.num_physical - num_logical)
        bal = {"before": balancedness(weight, trivial.phy2log, args.num_ranks).tolist(),
               "after": balancedness(weight, placement.phy2log, args.num_ranks).tolist()}
        if previous is not None:
            bal["previous"] = balancedness(weight, previous.phy2log, args.num_ranks).tolist()
        if args.out:
            placement.to_file(args.out)
    except (ValueError, OSError) as e:  # PlacementError and RebalanceError are ValueErrors
        return _fail(e)

    doc = {"policy": policy, "num_layers": num_layers, "num_logical": num_logical,
           "num_physical": args.num_physical, "num_ranks": args.num_ranks, "num_groups": args.num_groups,
           "num_nodes": args.num_nodes, "phy2log": placement.phy2log.tolist(),
           "log2phy": placement.log2phy.tolist(), "logcnt": placement.logcnt.tolist(), "balancedness": bal}
    if report is not None:
        doc["moved_slots"] = {"before": report.moved_before.tolist(), "after": report.moved_after.tolist()}
        doc["kept_previous"] = report.kept_previous.tolist()
    doc["out"] = args.out
    print(json.dumps(doc) if args.json else _rebalance_text(doc))
    return 0


def _rebalance_text(doc: dict) -> str:
    per_rank = doc["num_physical"] // doc["num_ranks"]
    lines = [f"{doc['policy']} policy: {doc['num_layers']} MoE layers, {doc['num_logical']} logical experts -> "
             f"{doc['num_physical']} slots on {doc['num_ranks']} ranks ({per_rank} per rank)"]
    for layer in range(doc["num_layers"]):
        lines += [f"layer {layer}", f"  phy2log {doc['phy2log'][layer]}", f"  log2phy {doc['log2phy'][layer]}",
                  f"  logcnt  {doc['logcnt'][layer]}"]
    bal, moved = doc["balancedness"], doc.get("moved_slots")
    head = f"{'layer':>5} {'before':>7} {'after':>7}"
    if moved:
        head += f" {'previous':>8} {'moved':>6} {'minimised':>9}"
    lines.append("balancedness: mean over max per-rank load (1.0 is perfect); before: the trivial placement")
    if moved:
        lines.append("moved: slots whose expert changes from --previous to the plain rebalance; minimised: to the "
                     "placement printed")
    lines.append(head)
    for layer in range(doc["num_layers"]):
        line = f"{layer:>5} {bal['before'][layer]:>7.3f} {bal['after'][layer]:>7.3f}"
        if moved:
            kept = " (previous kept)" if doc["kept_previous"][layer] else ""
            line += f" {bal['previous'][layer]:>8.3f} {moved['before'][layer]:>6} {moved['after'][layer]:>9}{kept}"
        lines.append(line)
    mean = [sum(v) / len(v) for v in (bal["before"], bal["after"])]
    line = f"{'mean':>5} {mean[0]:>7.3f} {mean[1]:>7.3f}"
    if moved:
        previous = sum(bal["previous"]) / len(bal["previous"])
        line += f" {previous:>8.3f} {sum(moved['before']):>6} {sum(moved['after']):>9}"
    lines.append(line)
    if doc["out"]:
        lines.append(f"placement written to {doc['out']}")
    return "\n".join(lines)


def run_simulate(args: argparse.Namespace) -> int:
    from moemesh.services.eplb.simulate import format_table, plot, simulate
    from moemesh.telemetry.expert_load_file import read_windows

    try:
        redundant = parse_counts(args.redundant)
        windows = read_windows(args.stats)
        sim = simulate(windows, args.num_ranks, args.num_groups, args.num_nodes, redundant,
                       None if args.role == "all" else args.role, args.policy)
        if args.png:
            plot(sim, args.png)
    except (ValueError, OSError) as e:  # StatsFileError, SimulationError are ValueErrors
        return _fail(e)
    if args.json:
        doc = {key: getattr(sim, key) for key in ("policy", "num_ranks", "num_groups", "num_nodes", "num_layers",
                                                  "num_logical", "history_windows", "future_windows")}
        doc["rows"] = [{"redundant": row.redundant, "num_physical": row.num_physical,
                        **dict(zip(("trivial", "rebalanced", "oracle"), row.means(), strict=True)),
                        "layers": {"trivial": row.trivial, "rebalanced": row.rebalanced, "oracle": row.oracle}}
                       for row in sim.rows]
        doc["png"] = args.png
        print(json.dumps(doc))
    else:
        print(format_table(sim))
        if args.png:
            print(f"plot written to {args.png}")
    return 0


def read_weights(path: str) -> torch.Tensor:
    """FILE.json holding {"weight": [[...], ...]} or a bare [[...], ...] -> weight [L, E] float64."""
    import torch  # here, not at the top: `moemesh --help` should not wait for torch

    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"cannot read weights file {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"weights file {path} is not valid JSON: {e}") from None
    rows = data.get("weight") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise ValueError(f'weights file {path}: expected {{"weight": [[...], ...]}} or [[...], ...], one non-empty '
                         f"row per MoE layer")
    widths = sorted({len(r) for r in rows})
    if len(widths) != 1:
        raise ValueError(f"weights file {path}: rows differ in length (experts per layer): {widths}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for r in rows for v in r):
        raise ValueError(f"weights file {path}: entries must be numbers")
    return torch.tensor(rows, dtype=torch.float64)


def parse_counts(text: str) -> list[int]:
    """"0,8,16" -> [0, 8, 16]."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--redundant must be comma-separated ints, got {text!r}") from None
    if not counts or any(c < 0 for c in counts):
        raise ValueError(f"--redundant must list ints >= 0, got {text!r}")
    return counts


def _fail(error: BaseException) -> int:
    print(f"moemesh: error: {error}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m moemesh.services.cli.eplb_cmd eplb ...`: the command group on its own, as `moemesh` runs it."""
    parser = argparse.ArgumentParser(prog="moemesh")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
