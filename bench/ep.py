"""`moemesh bench ep`: expert parallelism on this machine, side by side in one run.

For EP sizes 1, 2, 4 (each an EP group of rank processes over gloo, the cores split between them):
one MoE layer's time, a decode step's tokens/s for the whole group, dispatch+combine bytes/s against a
bare `all_to_all_single` moving the same bytes, and decode steps with two-batch overlap on against off
at several batch sizes. Rank 0 of each group writes its figures as JSON; this process prints the tables
and the ratios.

The file doubles as the rank script: `python -m moemesh.bench.ep RANK SIZE ADDR CKPT OUT OPTIONS_JSON`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ep-sizes", default="1,2,4")
    p.add_argument("--preset", default="bench", help="model preset (tiny, bench)")
    p.add_argument("--moe-tokens", default="16,256", help="tokens per rank in the MoE layer timings")
    p.add_argument("--batch-sizes", default="2,8,32", help="sequences per rank in the decode timings")
    p.add_argument("--decode-steps", type=int, default=12, help="timed decode steps per measurement")
    p.add_argument("--repeats", type=int, default=15, help="timed repetitions of the layer and comm timings")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")


def run(args: argparse.Namespace) -> int:
    from moemesh.bench.ep_report import report
    from moemesh.model.tiny import tiny_config, write_checkpoint

    sizes = [int(s) for s in args.ep_sizes.split(",")]
    options = {"moe_tokens": [int(t) for t in args.moe_tokens.split(",")],
               "batch_sizes": [int(b) for b in args.batch_sizes.split(",")],
               "decode_steps": args.decode_steps, "repeats": args.repeats}
    results: dict[int, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / "model", tiny_config(args.preset), seed=0)
        for size in sizes:
            result = run_group("moemesh.bench.ep", size, ckpt, Path(tmp) / f"ep{size}.json", options)
            if result is None:
                return 1
            results[size] = result
            print(f"EP {size}: done", file=sys.stderr)
    print(report(results, args.preset))
    if args.json:
        Path(args.json).write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    return 0


# How long one group may take before it is killed: a rank stuck in a collective (its peer gone) never returns.
GROUP_TIMEOUT_S = 1800.0


def run_group(module: str, size: int, ckpt: Path, out: Path, options: dict[str, Any],
              timeout_s: float = GROUP_TIMEOUT_S) -> dict[str, Any] | None:
    """Run `python -m MODULE RANK SIZE ADDR CKPT OUT OPTIONS_JSON` for every rank of a new group, the cores
    split between them; rank 0's JSON, or None (after saying why) when a rank failed or the group took longer
    than `timeout_s`.

    The first rank to fail ends the group: the others would wait for it in the rendezvous or the next
    collective until gloo's own timeout (half an hour), so they are killed at once, as is every rank still
    running at the deadline.
    """
    from moemesh.service.launch import die_with_parent
    from moemesh.worker.ep_args import free_local_addr

    addr = free_local_addr()
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // size))}
    procs = [subprocess.Popen([sys.executable, "-m", module, str(r), str(size), addr, str(ckpt), str(out),
                               json.dumps(options)], env=env, preexec_fn=die_with_parent) for r in range(size)]
    deadline = time.monotonic() + timeout_s
    why = ""
    try:
        while not why:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                why = "; ".join(f"rank {r} exited with code {c}" for r, c in failed)
            elif all(c == 0 for c in codes):
                return json.loads(out.read_text())
            elif time.monotonic() > deadline:
                running = [r for r, c in enumerate(codes) if c is None]
                why = f"not done after {timeout_s:g} s (ranks {running} still running)"
            else:
                time.sleep(0.1)
    finally:
        killed = [r for r, p in enumerate(procs) if p.poll() is None]
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    print(f"{module}: EP group of {size}: {why}" + (f"; killed ranks {killed}" if killed else ""), file=sys.stderr)
    return None


# ---- one rank ----------------------------------------------------------------------------------------------------

def _rank(rank: int, size: int, addr: str, ckpt: str, out: str, options: dict[str, Any]) -> None:
    import torch

    from moemesh.engine.engine import Engine, EngineConfig
    from moemesh.ep.group import EPConfig, EPGroup

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    group = EPGroup(EPConfig(size=size, rank=rank, init_addr=addr)) if size > 1 else None
    engine = Engine(EngineConfig(model=ckpt, dtype="float32", kv_cache_mb=256, max_num_seqs=256,
                                 record_expert_load=False), ep=group)
    result: dict[str, Any] = {"moe_layer_ms": {}, "decode_tok_s": {}, "tbo": {}, "comm": {}}
    for t in options["moe_tokens"]:
        result["moe_layer_ms"][t] = _moe_layer_ms(engine.model, group, t, rank, options["repeats"])
    for b in options["batch_sizes"]:
        result["decode_tok_s"][b] = _decode_tok_s(engine, group, b, options["decode_steps"], split=False)
        if group is not None:
            result["tbo"][b] = _decode_tok_s(engine, group, b, options["decode_steps"], split=True)
    if group is not None:
        for t in options["moe_tokens"]:
            result["comm"][t] = _comm(engine.model, group, t, rank, options["repeats"])
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    if group is not None:
        group.barrier()
        group.close()


def _timed(fn: Any, group: Any, repeats: int) -> float:
    """Median over `repeats` of the slowest rank's time for `fn()` (seconds); one warm-up call."""
    import torch
    import torch.distributed as dist

    fn()
    times = []
    for _ in range(repeats):
        if group is not None:
            group.barrier()
        t0 = time.perf_counter()
        fn()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        if group is not None:
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        times.append(float(dt))
    return statistics.median(times)


def _first_moe(model: Any) -> Any:
    from moemesh.model.moe import MoE

    return next(m for m in model.modules() if isinstance(m, MoE))


def _moe_layer_ms(model: Any, group: Any, tokens: int, rank: int, repeats: int) -> float:
    import torch

    moe = _first_moe(model)
    x = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(rank))
    with torch.inference_mode():
        return 1e3 * _timed(lambda: moe(x), group, repeats)


def _decode_tok_s(engine: Any, group: Any, batch: int, steps: int, split: bool) -> float:
    """The group's output tokens/s over `steps` lockstep decode steps of `batch` sequences per rank."""
    import torch
    import torch.distributed as dist

    from moemesh.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=steps + 4, temperature=0, ignore_eos=True)
    ids = [engine.add_request([(11 * i + j) % 1000 + 1 for j in range(32)], params) for i in range(batch)]

    def step() -> int:
        b = engine.schedule()
        if group is None:
            return len(engine.execute(b))
        vote = group.vote(b is not None, engine.can_split(b), False)
        return len(engine.execute(b, split and vote.all_can_split))

    while True:  # prefill (and the first token): not timed; ranks agree when all are done
        pending = any(engine.requests[i].num_output_tokens == 0 for i in ids)
        if group is not None:
            pending = group.vote(pending, True, False).any_batch
        if not pending:
            break
        step()
    step()
    if group is not None:
        group.barrier()
    t0 = time.perf_counter()
    made = sum(step() for _ in range(steps))
    elapsed = time.perf_counter() - t0
    for i in ids:
        engine.abort(i)
    total = torch.tensor([made], dtype=torch.float64)
    if group is not None:
        dist.all_reduce(total)
    return float(total) / elapsed


def _comm(model: Any, group: Any, tokens: int, rank: int, repeats: int) -> dict[str, float]:
    """Dispatch+combine (identity experts) against two bare all_to_all_single calls with the same splits."""
    import torch
    import torch.distributed as dist

    experts = _first_moe(model).experts
    disp = experts.dispatcher
    cfg = model.config
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(tokens, cfg.hidden_size, generator=g)
    topk = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:cfg.num_experts_per_tok]
                        for _ in range(tokens)]) if tokens else torch.empty(0, cfg.num_experts_per_tok)
    phys = experts.placement.physical_ids(experts.layer, topk.long())
    weights = torch.full(topk.shape, 1.0 / cfg.num_experts_per_tok)
    _, handle = disp.dispatch(x, phys, weights)
    send, recv = handle.send_rows, handle.recv_rows
    # Hidden-state bytes crossing between ranks, there and back, over the whole group (rows a rank
    # sends itself are a local copy, not counted; the pair records and counts are the dispatcher's overhead).
    moved = torch.tensor([(sum(send) - send[rank]) * cfg.hidden_size * x.element_size() * 2], dtype=torch.float64)
    dist.all_reduce(moved)
    send_x, recv_x = x.new_empty(sum(send), x.shape[1]), x.new_empty(sum(recv), x.shape[1])

    def ep_round() -> None:
        r, h = disp.dispatch(x, phys, weights)
        disp.combine(r.x, h)

    def bare_round() -> None:
        dist.all_to_all_single(recv_x, send_x, recv, send)
        dist.all_to_all_single(send_x, recv_x, send, recv)

    with torch.inference_mode():
        t_ep, t_bare = _timed(ep_round, group, repeats), _timed(bare_round, group, repeats)
    return {"bytes": float(moved), "ep_s": t_ep, "bare_s": t_bare}


if __name__ == "__main__":
    _r, _s, _addr, _ckpt, _out, _opts = sys.argv[1:7]
    _rank(int(_r), int(_s), _addr, _ckpt, _out, json.loads(_opts))
