"""`moemesh bench ...`: benchmarks that compare things side by side in one run and print ratios."""

from __future__ import annotations

import argparse

from moemesh.device import add_device_argument


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    e = bsub.add_parser("engine", help="engine decode/prefill tokens/s against Hugging Face generate",
                        description="Decode tokens/s at several batch sizes and prefill tokens/s on long prompts, "
                                    "for the engine and for Hugging Face transformers' generate, same "
                                    "checkpoint, same prompts, same threads; prints the ratios.")
    e.add_argument("--presets", default="tiny,bench", help="comma-separated model presets (tiny, bench)")
    e.add_argument("--model", default=None, help="benchmark this checkpoint folder instead of the presets")
    e.add_argument("--batch-sizes", default="1,8,32")
    e.add_argument("--prompt-len", type=int, default=32, help="prompt tokens in the decode runs")
    e.add_argument("--output-len", type=int, default=64, help="generated tokens per request in decode runs")
    e.add_argument("--prefill-len", type=int, default=512)
    e.add_argument("--prefill-batch", type=int, default=4)
    e.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (the best is kept)")
    e.add_argument("--no-hf", action="store_true", help="skip the Hugging Face reference")
    add_device_argument(e, " (both the engine and the reference run there)")
    e.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    e.set_defaults(func=_run_engine)
    t = bsub.add_parser("transfer", help="KV transfer GB/s and latency per data plane against memcpy")
    t.add_argument("--model", default=None, help="take the KV row shape from this checkpoint (default: tiny)")
    t.add_argument("--planes", default="inproc,relay,ucx", help="comma-separated data planes")
    t.add_argument("--prompt-tokens", type=int, default=2048)
    t.add_argument("--repeats", type=int, default=5)
    t.add_argument("--json", default=None, metavar="FILE")
    t.set_defaults(func=_run_transfer)
    m = bsub.add_parser("mesh", help="mesh end-to-end tok/s and TTFT (colocated, PD relay/UCX) against the engine",
                        description="Output tokens/s, TTFT and inter-token latency at several concurrency levels, "
                                    "for the in-process engine and for `moemesh up` meshes (colocated, PD over "
                                    "the relay, PD over UCX), same prompts; prints the ratios to the engine.")
    from moemesh.bench.mesh import add_arguments as add_mesh_arguments

    add_mesh_arguments(m)
    m.set_defaults(func=_run_mesh)
    ep = bsub.add_parser("ep", help="expert parallelism: MoE layer, decode tok/s, dispatch vs bare all-to-all, TBO",
                         description="At EP 1, 2, 4 (rank processes over gloo): one MoE layer's time, a decode "
                                     "step's tokens/s, dispatch+combine bytes/s against a bare all_to_all_single "
                                     "of the same bytes, and two-batch overlap on against off; prints the ratios.")
    from moemesh.bench.ep import add_arguments as add_ep_arguments

    add_ep_arguments(ep)
    ep.set_defaults(func=_run_ep)
    lb = bsub.add_parser("eplb", help="rebalancing on a skewed workload: balancedness, decode tok/s, switch pause",
                         description="An EP group under routing skewed towards rank 0's experts decodes, rebalances "
                                     "live, and decodes again; prints balancedness and tokens/s before and after, "
                                     "and the pause the switch cost.")
    from moemesh.bench.eplb import add_arguments as add_eplb_arguments

    add_eplb_arguments(lb)
    lb.set_defaults(func=_run_eplb)
    lp = bsub.add_parser("eplb-policy", help="the refined EPLB policy against DeepSeek's: balancedness and run time",
                         description="DeepSeek's EPLB (auto) and the refined policy on the same skewed synthetic "
                                     "loads (EP 32 and EP 72) and on recorded ones (--stats); prints balancedness "
                                     "of both, the gain per case and per layer, and each policy's run time.")
    from moemesh.bench.eplb_policy import add_arguments as add_eplb_policy_arguments

    add_eplb_policy_arguments(lp)
    lp.set_defaults(func=_run_eplb_policy)
    pr = bsub.add_parser("profile", help="one engine's decode and prefill step: where the time goes, and the limits",
                         description="Step times and torch-profiler tables of one decode step and one prefill step, "
                                     "with this machine's read bandwidth and matmul peak measured on the spot, the "
                                     "weight bytes a decode step reads and the matrix FLOPs of a prefill step.")
    from moemesh.bench.profile import add_arguments as add_profile_arguments

    add_profile_arguments(pr)
    pr.set_defaults(func=_run_profile)
    sc = bsub.add_parser("ep-scale", help="a large checkpoint at several EP sizes: each rank's peak RSS against its "
                                          "share of the weights, and the greedy tokens side by side",
                         description="`moemesh up --ep-size N --prefill 0` per EP size on the checkpoint; each rank's "
                                     "peak resident memory against the weights it must hold; greedy tokens compared.")
    from moemesh.bench.ep_scale import add_arguments as add_scale_arguments

    add_scale_arguments(sc)
    sc.set_defaults(func=_run_ep_scale)
    from moemesh.bench.serve import add_parsers as add_serve_parsers  # `bench serve`, `bench plot`

    add_serve_parsers(bsub)


def _run_engine(args: argparse.Namespace) -> int:
    from moemesh.bench.engine import run

    return run(args)


def _run_transfer(args: argparse.Namespace) -> int:
    from moemesh.bench.transfer import run

    return run(args)


def _run_mesh(args: argparse.Namespace) -> int:
    from moemesh.bench.mesh import run

    return run(args)


def _run_ep(args: argparse.Namespace) -> int:
    from moemesh.bench.ep import run

    return run(args)


def _run_eplb(args: argparse.Namespace) -> int:
    from moemesh.bench.eplb import run

    return run(args)


def _run_eplb_policy(args: argparse.Namespace) -> int:
    from moemesh.bench.eplb_policy import run

    return run(args)


def _run_profile(args: argparse.Namespace) -> int:
    from moemesh.bench.profile import run

    return run(args)


def _run_ep_scale(args: argparse.Namespace) -> int:
    from moemesh.bench.ep_scale import run

    return run(args)
