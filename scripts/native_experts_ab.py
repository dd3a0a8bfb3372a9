"""One MoE layer's routed experts with the native kernel against oneDNN's forms, interleaved, on one thread.

    python scripts/native_experts_ab.py --shape small      # 24 experts of [384, 192], top-4
    python scripts/native_experts_ab.py --shape compute    # 64 experts of [1024, 384], top-6

Random bf16 weights for several layers, cycled so that each call reads its experts from memory as a model's
step does; each round times every size once with each kernel (the machine is shared: interleaving spreads its
noise over both); prints the median per call and the chosen experts' bytes per second of the native one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moemesh.kernels import native, onednn
from moemesh.model.moe import RoutedExperts

SHAPES = {"small": (24, 384, 192, 4), "compute": (64, 1024, 384, 6)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="small")
    p.add_argument("--tokens", default="1,4,16,32,64")
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    lib = native.library()
    if lib is None:
        raise SystemExit(f"no native kernel here: {native.why_not() or 'turned off'}")
    e, d, i, k = SHAPES[args.shape]
    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(args.layers):
        m = RoutedExperts(e, d, i).to(torch.bfloat16)
        with torch.no_grad():
            m.w13.copy_(torch.randn(m.w13.shape, generator=g) * 0.05)
            m.w2.copy_(torch.randn(m.w2.shape, generator=g) * 0.05)
        layers.append((m, {"native": onednn.experts_kernel(m.w13, m.w2), "oneDNN": onednn.PackedExperts(m.w13, m.w2)}))
    print(f"{args.shape}: {e} experts of [{d}, {i}], top-{k}; {args.layers} layers cycled; one thread")
    for t in (int(s) for s in args.tokens.split(",")):
        x = torch.randn(t, d, generator=g).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
        weights = torch.rand(t, k, generator=g)
        times: dict[str, list[float]] = {"native": [], "oneDNN": []}
        with torch.inference_mode():
            for _ in range(args.rounds):
                for name, samples in times.items():
                    t0, n = time.perf_counter(), 0
                    for _ in range(4):
                        for m, kernels in layers:
                            m.kernel = kernels[name]
                            m(x, ids, weights)
                            n += 1
                    samples.append((time.perf_counter() - t0) / n)
        chosen = ids.unique().numel() * 3 * d * i * 2
        nat, cur = statistics.median(times["native"]), statistics.median(times["oneDNN"])
        print(f"{t:3d} tokens, {ids.unique().numel():2d} experts ({chosen / 1e6:5.1f} MB): native {nat * 1e6:6.0f} us "
              f"({chosen / nat / 1e9:4.1f} GB/s), oneDNN {cur * 1e6:6.0f} us: {cur / nat:.2f}x")


if __name__ == "__main__":
    main()
