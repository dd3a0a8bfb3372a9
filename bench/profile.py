"""Where an engine step's time goes, and how far it is from this machine's limits.

One engine, one checkpoint: B prompts are prefilled, then decode steps run at batch B. It prints
  - the step times (best of several) of one decode step and one prefill step of B prompts;
  - the top operators of each by self CPU time (torch profiler), so per-op overhead shows as counts;
  - the limits measured on the spot: memory read bandwidth and matmul GFLOP/s in fp32 and bf16;
  - decode: the weight bytes one step reads (dense weights, plus the routed experts this step's tokens
    chose, counted from the router's own choice) against the read bandwidth: the step's floor;
  - prefill: the step's matrix FLOPs against the matmul peak of the compute dtype.

    moemesh bench profile --model DIR [--batch 4] [--prompt-len 128] [--dtype auto] [--num-threads 1]
                          [--native auto|off] [--native-ab ROUNDS] [--layer-ab ROUNDS]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from moemesh.bench.timing import best_time

if TYPE_CHECKING:
    import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--dtype", default="auto", help="the engine's dtype (auto: the engine's default choice)")
    p.add_argument("--batch", type=int, default=4, help="sequences per decode step, and prompts per prefill step")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--kernels", default="auto", help="the engine's kernel set (moemesh.kernels)")
    p.add_argument("--num-threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--steps", type=int, default=20, help="decode steps timed (the best is kept)")
    p.add_argument("--top", type=int, default=25, help="operators listed per profile")
    p.add_argument("--no-profile", action="store_true", help="step times and limits only")
    p.add_argument("--native", choices=("auto", "off"), default="auto",
                   help="the native CPU kernels (moemesh.kernels.native): where they build, or never")
    p.add_argument("--native-ab", type=int, default=0, metavar="ROUNDS",
                   help="also time decode steps with and without the native kernels, interleaved, ROUNDS times")
    p.add_argument("--layer-ab", type=int, default=0, metavar="ROUNDS",
                   help="also time decode steps with the one-call layer halves and with the per-module kernels, "
                        "interleaved, ROUNDS times")


def read_bandwidth_gbs(mb: int = 512) -> float:
    """Bytes/s a full-tensor reduction reads (each byte once, far beyond the caches), in GB/s."""
    import torch

    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    return x.numel() * 4 / best_time(x.sum, 5) / 1e9


def matmul_gflops(dtype: torch.dtype, n: int = 2048) -> float:
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    return 2 * n**3 / best_time(lambda: a @ b, 5) / 1e9


def _engine(args: argparse.Namespace):
    from moemesh.engine.engine import Engine, EngineConfig

    return Engine(EngineConfig(model=args.model, dtype=args.dtype, enable_prefix_caching=False,
                               max_num_seqs=max(64, args.batch), max_num_batched_tokens=args.batch * args.prompt_len,
                               num_threads=args.num_threads, kv_cache_mb=1024, record_expert_load=False,
                               kernels=args.kernels))


def _alternate(engine, rounds: int, steps: int, title: str, setups: dict[str, Callable[[], None]]) -> None:
    """Decode steps of the same engine under each of two `setups` (name -> what sets it up), alternating `rounds`
    times (the machine is shared: interleaving spreads its noise over both), best of `steps` each; prints the pairs."""
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(rounds):
        for name, setup in setups.items():
            setup()
            engine.step()
            times[name].append(best_time(engine.step, steps))
    first, second = times.values()
    print(f"decode step, {title} (interleaved, ms): " + "; ".join(
        f"{a * 1e3:.2f} / {b * 1e3:.2f}" for a, b in zip(first, second, strict=True)))


def _native_ab(engine, rounds: int, steps: int) -> None:
    """Decode steps with the native kernels and without (`_alternate`)."""
    import os

    from moemesh.kernels import native
    from moemesh.kernels.backends import decode_attention, install_kernels

    def reinstall() -> None:  # the kernels as the environment now says
        install_kernels(engine.model, engine.kernels)
        engine.runner.decode_kernel = decode_attention(engine.kernels)

    def native_kernels(env: str) -> Callable[[], None]:
        def setup() -> None:
            os.environ[native.ENV] = env
            reinstall()
        return setup

    before = os.environ.get(native.ENV)
    try:
        _alternate(engine, rounds, steps, "native kernels on / off",
                   {"native": native_kernels("1"), "without": native_kernels("0")})
    finally:  # the environment and the kernels as they were: what runs next measures the engine as configured
        if before is None:
            os.environ.pop(native.ENV, None)
        else:
            os.environ[native.ENV] = before
        reinstall()


def _layer_ab(engine, rounds: int, steps: int) -> None:
    """Decode steps with the layers' one-call kernels (moemesh.kernels.native_decoder) and with the per-module
    kernels alone (`_alternate`)."""
    layers = engine.model.model.layers
    installed = [(layer.attention_kernel, layer.mlp_kernel) for layer in layers]
    if not any(a or m for a, m in installed):
        print("decode step, one-call layers: none installed (not bf16 on a CPU with the native kernels)")
        return

    def layer_kernels(on: bool) -> Callable[[], None]:
        def setup() -> None:
            for layer, (a, m) in zip(layers, installed, strict=True):
                layer.attention_kernel, layer.mlp_kernel = (a, m) if on else (None, None)
        return setup

    try:
        _alternate(engine, rounds, steps, "one-call layer halves / per-module kernels",
                   {"one call": layer_kernels(True), "per module": layer_kernels(False)})
    finally:
        layer_kernels(True)()


def _prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(8, vocab, (n, length), generator=g).tolist()


def _decode_weight_bytes(engine, token_ids: list[int]) -> tuple[int, int]:
    """-> (bytes every decode step reads whatever the routing, bytes of the routed experts that the
    given tokens' routing chose, each expert counted once per layer), for the engine's weights."""
    import torch

    from moemesh.model.moe import MoE, RoutedExperts

    model = engine.model
    routed = {id(p) for m in model.modules() if isinstance(m, RoutedExperts) for p in m.parameters()}
    embed = model.model.embed_tokens.weight
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in routed and p is not embed)
    dense += len(token_ids) * embed[0].numel() * embed.element_size()  # only the rows of the step's tokens
    chosen = 0
    choice = {}

    def keep(mod, _inp, out):  # on the router: every form of the layer (modules or one-call kernels) asks it
        choice[mod] = out[0]

    moes = [m for m in model.modules() if isinstance(m, MoE)]
    hooks = [m.gate.register_forward_hook(keep) for m in moes]
    try:
        from moemesh.model.mla import NoCacheAttention

        ids = torch.tensor(token_ids, device=engine.runner.device)
        with torch.inference_mode():
            model(ids, torch.zeros_like(ids), NoCacheAttention([1] * len(token_ids)))
            for m in moes:
                experts = choice[m.gate].unique().numel()
                per_expert = sum(p[0].numel() * p.element_size() for p in m.experts.parameters())
                chosen += experts * per_expert
    finally:
        for h in hooks:
            h.remove()
    return dense, chosen


def _matmul_flops_per_token(engine, context: int) -> float:
    """Matrix FLOPs of one prefill token: every dense weight once, K routed experts per MoE layer, and
    the naive-form attention over `context` keys (half of them on average, causal)."""
    from moemesh.model.moe import MoE, RoutedExperts

    model, cfg = engine.model, engine.model.config
    routed = {id(p) for m in model.modules() if isinstance(m, RoutedExperts) for p in m.parameters()}
    dense = sum(p.numel() for n, p in model.named_parameters()
                if id(p) not in routed and p.dim() == 2 and "embed_tokens" not in n and "gate.weight" not in n)
    moe_layers = sum(1 for m in model.modules() if isinstance(m, MoE))
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    attn = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * context / 2
    return 2 * (dense + moe_layers * (cfg.num_experts_per_tok or 0) * per_expert + attn)


def _profile(fn: Callable[[], object], top: int, title: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"\n{title}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top), flush=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from moemesh.engine.sampling_params import SamplingParams

    if args.native == "off":
        import os

        from moemesh.kernels import native

        os.environ[native.ENV] = "0"
    engine = _engine(args)
    cfg, dtype = engine.model.config, next(engine.model.parameters()).dtype
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model}: hidden {cfg.hidden_size}, "
          f"{cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}, "
          f"compute dtype {str(dtype).removeprefix('torch.')}, kernels {engine.kernels}", flush=True)
    params = SamplingParams(max_tokens=10**6, temperature=0.0, ignore_eos=True)
    seeds = iter(range(10**6))

    def prefill_step() -> None:
        # Fresh prompts every time, as a server sees them: the routing, hence every expert's row count, changes,
        # and with it the shapes the matmul library meets (a new shape costs it a kernel set-up).
        for p in _prompts(args.batch, args.prompt_len, cfg.vocab_size, seed=next(seeds)):
            engine.add_request(p, params)
        engine.step()  # the whole batch of prompts fits one step's token budget

    def drop_all() -> None:
        for rid in list(engine.requests):
            engine.abort(rid)

    prefill_step()
    drop_all()
    t_prefill = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        prefill_step()
        t_prefill = min(t_prefill, time.perf_counter() - t0)
        drop_all()
    prefill_step()
    for _ in range(3):
        engine.step()
    t_decode = best_time(engine.step, args.steps)
    last = [r.all_token_ids[-1] for r in engine.requests.values()]
    if args.native_ab:
        _native_ab(engine, args.native_ab, args.steps)
    if args.layer_ab:
        _layer_ab(engine, args.layer_ab, args.steps)

    bw = read_bandwidth_gbs()
    peak = {d: matmul_gflops(d) for d in (torch.float32, torch.bfloat16)}
    dense, chosen = _decode_weight_bytes(engine, last)
    floor = (dense + chosen) / (bw * 1e9)
    flops = _matmul_flops_per_token(engine, args.prompt_len) * args.batch * args.prompt_len
    print(f"machine: read bandwidth {bw:.1f} GB/s; matmul {peak[torch.float32]:.0f} GFLOP/s fp32, "
          f"{peak[torch.bfloat16]:.0f} GFLOP/s bf16 (2048^3, {torch.get_num_threads()} threads)")
    print(f"decode step, batch {args.batch}: {t_decode * 1e3:.2f} ms; weights read {(dense + chosen) / 1e6:.1f} MB "
          f"({dense / 1e6:.1f} MB dense + {chosen / 1e6:.1f} MB of the routed experts chosen): floor "
          f"{floor * 1e3:.2f} ms at {bw:.1f} GB/s, step at {floor / t_decode:.0%} of it")
    print(f"prefill step, {args.batch} x {args.prompt_len}: {t_prefill * 1e3:.1f} ms, {flops / 1e9:.2f} GFLOP of "
          f"matrix work: {flops / t_prefill / 1e9:.0f} GFLOP/s, {flops / t_prefill / 1e9 / peak[dtype]:.0%} of the "
          f"{str(dtype).removeprefix('torch.')} peak" if dtype in peak else "")
    if not args.no_profile:
        _profile(lambda: [engine.step() for _ in range(5)], args.top, f"5 decode steps at batch {args.batch}:")
        drop_all()
        _profile(prefill_step, args.top, f"one prefill step of {args.batch} x {args.prompt_len}:")
    return 0
