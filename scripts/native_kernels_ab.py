"""The native decode kernels against the forms they replace, interleaved, on one thread.

    python scripts/native_kernels_ab.py                     # the small shape's layers
    python scripts/native_kernels_ab.py --shape compute     # the compute shape's

For each linear layer of the shape (random bf16 weights, several copies cycled so that each call reads its weight
from memory as a model's step does): the native dot products against oneDNN's prepacked matmul at 1, 2, 4 and 8
rows. For decode attention: the native kernel against the torch form (pages gathered, four batched matmuls) over
a paged cache, at the shape's heads, batch 1/4/16 and 128-300 tokens. For one MoE layer's routed experts at
`--expert-tokens` tokens: the native kernels (the installed `NativeExperts`) against oneDNN's forms. For the
rotary embedding at 1-64 tokens: the native kernel against the module's torch form. Each round
times every case once with each kernel (the machine is shared: interleaving spreads its noise over both); prints
the median per call and the gain.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from moemesh.kernels import native, onednn
from moemesh.kernels.native_layers import NativeRope
from moemesh.model.config import RopeConfig
from moemesh.model.moe import RoutedExperts
from moemesh.model.rope import RotaryEmbedding

# name: (linear layers as (rows out, rows in), heads, nope dim, v dim, routed experts as (E, D, I, top-k))
SHAPES = {
    "small": ({"q_a": (192, 384), "q_b": (768, 192), "kv_a": (576, 384), "o_proj": (384, 384),
               "shared gate_up": (384, 384), "shared down": (384, 192), "lm_head": (1024, 384)}, 6, 64, 64,
              (24, 384, 192, 4)),
    "compute": ({"q_a": (512, 1024), "q_b": (3072, 512), "kv_a": (576, 1024), "o_proj": (1024, 2048),
                 "shared gate_up": (768, 1024), "shared down": (1024, 384), "lm_head": (4096, 1024)}, 16, 128, 128,
                (64, 1024, 384, 6)),
}


def _time(fn: Callable[[], object], calls: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls


def _cycled(make: Callable[[int], Callable[[], object]], copies: int) -> Callable[[], object]:
    fns = [make(i) for i in range(copies)]
    state = [0]

    def call() -> object:
        state[0] = (state[0] + 1) % copies
        return fns[state[0]]()
    return call


def _torch_decode(q_nope, q_pe, kv_b, cache, pages, lens, page_size, scale):
    """The torch form of PagedAttention._decode, on the same inputs."""
    b, dn = q_nope.shape[0], q_nope.shape[2]
    c = kv_b.shape[2]
    w_uk, w_uv_t = kv_b[:, :dn].contiguous(), kv_b[:, dn:].transpose(1, 2).contiguous()
    kv = cache.view(-1, page_size, cache.shape[1]).index_select(0, pages.reshape(-1)).view(b, -1, cache.shape[1])
    q = torch.cat((torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1), q_pe), dim=-1)
    mask = torch.arange(kv.shape[1])[None, :] < lens[:, None]
    bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))[:, :, None]
    probs = torch.softmax(torch.bmm(kv, q.transpose(1, 2)).float() * scale + bias, dim=1).to(kv.dtype)
    o = torch.bmm(probs.transpose(1, 2), kv)[..., :c]
    return torch.bmm(o.transpose(0, 1), w_uv_t).transpose(0, 1)


def _experts(layer: tuple, which: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One MoE layer's routed experts with kernel `layer[which]` installed."""
    layer[0].kernel = layer[which]
    return layer[0](x, ids, weights)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="small")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--copies", type=int, default=6, help="weights / caches cycled per case")
    p.add_argument("--calls", type=int, default=50, help="calls per timing")
    p.add_argument("--expert-tokens", default="1,4,32,128,512", help="step sizes of the routed-experts cases")
    args = p.parse_args()
    torch.set_num_threads(1)
    lib = native.library()
    if lib is None:
        raise SystemExit(f"no native kernel here: {native.why_not() or 'turned off'}")
    linears, heads, dn, dv, (e, d, inter, top_k) = SHAPES[args.shape]
    g = torch.Generator().manual_seed(0)
    cases: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {}
    for name, (n, k) in linears.items():
        ws = [(torch.randn(n, k, generator=g) / math.sqrt(k)).to(torch.bfloat16) for _ in range(args.copies)]
        packed = [onednn.pack(w) for w in ws]
        for rows in (1, 2, 4, 8):
            x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
            cases[f"linear {name} [{n}, {k}] x {rows}"] = (
                _cycled(lambda i, x=x, ws=ws: lambda: native.linear(lib, x, ws[i]), args.copies),
                _cycled(lambda i, x=x, packed=packed: lambda: onednn.packed_linear(x, packed[i]), args.copies))
    c, r, page_size = 512, 64, 16
    for batch, tokens in ((1, 128), (4, 150), (16, 300)):
        per_seq = -(-tokens // page_size)
        num_pages = batch * per_seq * 4
        caches = [torch.randn(num_pages * page_size, c + r, generator=g).to(torch.bfloat16) for _ in range(args.copies)]
        kv_bs = [(torch.randn(heads, dn + dv, c, generator=g) / math.sqrt(c)).to(torch.bfloat16)
                 for _ in range(args.copies)]
        pages = torch.stack([torch.randperm(num_pages, generator=g)[:per_seq] for _ in range(batch)])
        lens = torch.full((batch,), tokens)
        q_nope = torch.randn(batch, heads, dn, generator=g).to(torch.bfloat16)
        q_pe = torch.randn(batch, heads, r, generator=g).to(torch.bfloat16)
        inputs = [(q_nope, q_pe, kv_bs[i], caches[i], pages, lens, page_size, 1 / math.sqrt(dn + r))
                  for i in range(args.copies)]
        cases[f"decode attention {heads} heads, batch {batch} x {tokens} tokens"] = (
            _cycled(lambda i, inputs=inputs: lambda: native.mla_decode(lib, *inputs[i]), args.copies),
            _cycled(lambda i, inputs=inputs: lambda: _torch_decode(*inputs[i]), args.copies))
    layers = []
    for _ in range(args.copies):
        m = RoutedExperts(e, d, inter).to(torch.bfloat16)
        with torch.no_grad():
            m.w13.copy_(torch.randn(m.w13.shape, generator=g) * 0.05)
            m.w2.copy_(torch.randn(m.w2.shape, generator=g) * 0.05)
        layers.append((m, onednn.experts_kernel(m.w13, m.w2), onednn.PackedExperts(m.w13, m.w2)))
    for tokens in (int(t) for t in args.expert_tokens.split(",")):
        x = torch.randn(tokens, d, generator=g).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(e, generator=g)[:top_k] for _ in range(tokens)])
        weights = torch.rand(tokens, top_k, generator=g)
        step = (x, ids, weights)
        cases[f"routed experts {e} x [{d}, {inter}], {tokens} tokens"] = tuple(
            _cycled(lambda i, which=which, step=step: lambda: _experts(layers[i], which, *step), args.copies)
            for which in (1, 2))
    rope = RotaryEmbedding(RopeConfig(), r, 4096, interleave=True)
    kernel = NativeRope(lib, rope)
    for tokens in (1, 4, 16, 64):
        q_pe = torch.randn(tokens, heads, dn + r, generator=g).to(torch.bfloat16)[..., dn:]  # views, as in the model
        k_pe = torch.randn(tokens, c + r, generator=g).to(torch.bfloat16)[:, c:]
        positions = torch.randint(0, 4096, (tokens,), generator=g)
        # The torch form's rotations are made once per step's positions tensor: a layer after the first reuses them.
        cases[f"rotary embedding {heads} heads, {tokens} tokens"] = (
            lambda positions=positions, q_pe=q_pe, k_pe=k_pe: kernel(positions, q_pe, k_pe),
            lambda positions=positions, q_pe=q_pe, k_pe=k_pe: rope(positions, q_pe, k_pe))
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in cases}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, (nat, other) in cases.items():
                times[name][0].append(_time(nat, args.calls))
                times[name][1].append(_time(other, args.calls))
    print(f"{args.shape} shape, one thread, median of {args.rounds} interleaved rounds (us per call)")
    print(f"{'case':<58} {'native':>9} {'replaced':>9} {'gain':>6}")
    for name, (nat, other) in times.items():
        a, b = statistics.median(nat) * 1e6, statistics.median(other) * 1e6
        print(f"{name:<58} {a:>9.1f} {b:>9.1f} {b / a:>5.2f}x")


if __name__ == "__main__":
    main()
