"""A checkpoint too large for one process, served by `moemesh up` at several EP sizes: each rank's peak resident
memory against its share of the weights, and the greedy tokens of every EP size side by side.

A rank's share is what it must hold: the dense weights (attention, dense MLPs, shared experts, embedding, head)
in the compute dtype, plus its slots' routed experts as the checkpoint stores them (FP8 with block scales for a
DeepSeek-V3-style checkpoint). Peak resident memory is the kernel's high-water mark of each rank process
(VmHWM), read once the ranks have loaded and served the prompts.

    moemesh make-tiny out/v3layer --preset v3-layer --dtype bfloat16
    moemesh bench ep-scale --model out/v3layer --ep-sizes 2,4
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from moemesh.service.launch import start_mesh


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--ep-sizes", default="2,4", help="comma-separated EP sizes, each one `moemesh up` run")
    p.add_argument("--prompts", type=int, default=3, help="greedy prompts served at each EP size")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--kernels", default="torch",
                   help="the workers' kernel set (torch: no prepacked second copy of the dense weights)")
    p.add_argument("--kv-cache-mb", type=int, default=64)
    p.add_argument("--ready-timeout", type=float, default=1800, help="seconds a mesh may take to load")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")


def rank_shares(model_dir: Path, ep_size: int) -> list[int]:
    """Bytes each rank of a default placement (experts in order, no replicas) must hold."""
    import torch

    from moemesh.ep.placement import ExpertPlacement
    from moemesh.model.config import ModelConfig
    from moemesh.model.loader import resolve_dtype
    from moemesh.model.safetensors_file import SafetensorsFile
    from moemesh.model.weights import checkpoint_shapes, expert_of

    cfg = ModelConfig.from_dir(model_dir)
    compute = torch.empty((), dtype=resolve_dtype(cfg, "auto")).element_size()
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    stored: dict[str, int] = {}  # bytes on disk per tensor, scales counted with their weight
    for shard in sorted(set(index.values())):
        with SafetensorsFile(model_dir / shard) as f:
            for name in f.keys():
                weight = name.removesuffix("_scale_inv")
                stored[weight] = stored.get(weight, 0) + f.nbytes(name)
    dense, per_expert = 0, {}
    for name, shape in checkpoint_shapes(cfg).items():
        at = expert_of(name)
        if at is None:
            router = name.endswith(("gate.weight", "e_score_correction_bias"))
            dense += torch.Size(shape).numel() * (4 if router else compute)
        else:
            per_expert[at] = per_expert.get(at, 0) + stored[name]
    placement = ExpertPlacement.default(cfg.num_moe_layers, cfg.n_routed_experts, ep_size)
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    shares = []
    for rank in range(ep_size):
        slots = placement.local_slots(rank)
        experts = sum(per_expert[(layer, int(e))] for m, layer in enumerate(moe_layers)
                      for e in placement.phy2log[m, slots.start:slots.stop])
        shares.append(dense + experts)
    return shares


def peak_rss(pid: int) -> int:
    """The process's resident-memory high-water mark in bytes (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def serve_at(model_dir: Path, ep_size: int, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    """One `moemesh up --ep-size N --prefill 0` run: greedy tokens, and each rank's peak RSS."""
    from moemesh.sdk import MeshClient

    log = tempfile.NamedTemporaryFile("w", prefix=f"moemesh-ep{ep_size}-", suffix=".log", delete=False)
    t0 = time.perf_counter()
    mesh = start_mesh(["--model", str(model_dir), "--ep-size", str(ep_size), "--prefill", "0", "--decode", "1",
                       "--", "--kernels", args.kernels, "--kv-cache-mb", str(args.kv_cache_mb)],
                      timeout_s=args.ready_timeout, sink=log)
    try:
        ready_s = time.perf_counter() - t0
        client = MeshClient(mesh.gateway)
        try:
            t1 = time.perf_counter()
            tokens = [client.generate(token_ids=p, max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True,
                                      timeout_s=args.ready_timeout).token_ids for p in prompts]
            serve_s = time.perf_counter() - t1
        finally:
            client.close()
        ranks = sorted((name, rec.pid) for name, rec in mesh.services.items() if "-dp" in name)
        rss = [peak_rss(pid) for _, pid in ranks]
    finally:
        mesh.stop()
        mesh.kill_leftovers()
    return {"ep_size": ep_size, "tokens": tokens, "peak_rss": rss, "ready_s": ready_s, "serve_s": serve_s,
            "log": log.name}


def run(args: argparse.Namespace) -> int:
    import torch

    from moemesh.model.config import ModelConfig

    model_dir = Path(args.model)
    vocab = ModelConfig.from_dir(model_dir).vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(8, vocab, (args.prompts, args.prompt_len), generator=g).tolist()
    results = []
    for ep in (int(x) for x in args.ep_sizes.split(",")):
        shares = rank_shares(model_dir, ep)
        res = serve_at(model_dir, ep, prompts, args)
        res["share"] = shares
        results.append(res)
        print(f"EP {ep}: ready in {res['ready_s']:.0f} s, {args.prompts} prompts served in {res['serve_s']:.1f} s")
        for r, (rss, share) in enumerate(zip(res["peak_rss"], shares, strict=True)):
            print(f"  rank {r}: peak RSS {rss / 2**30:.2f} GiB, share of the weights {share / 2**30:.2f} GiB, "
                  f"ratio {rss / share:.2f}")
    same = all(r["tokens"] == results[0]["tokens"] for r in results)
    print(f"greedy tokens equal across EP sizes {args.ep_sizes}: {same}")
    for r in results:
        print(f"  EP {r['ep_size']}: {r['tokens']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if same else 1
