"""Command-line options shared by the services that run an engine (prefill, decode)."""

from __future__ import annotations

import argparse

from moemesh.device import add_device_argument
from moemesh.engine.engine import EngineConfig
from moemesh.kernels.backends import CHOICES as KERNEL_CHOICES
from moemesh.service import cpus

# A worker queues at most this many requests beyond its running batch (SGLang's --max-queued-requests):
# a few batches' worth (--max-num-seqs defaults to 64), so that a flood is refused in milliseconds
# instead of waiting, and holding memory, for minutes.
DEFAULT_MAX_WAITING_REQUESTS = 256


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="checkpoint folder (default: the embedded tiny model)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    g.add_argument("--kv-cache-mb", type=int, default=512, help="memory for the paged KV cache")
    g.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="requests in the running batch at most")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="prompt tokens per prefill step (default: 512 on a CPU, 2048 on a GPU)")
    g.add_argument("--max-prefill-tokens", type=_tokens, default=None, metavar="N",
                   help="new prompts join a prefill step while their uncached tokens stay within N (the first "
                        "always does), so that prompts arriving together leave in shorter steps, the first ones' "
                        "first tokens earlier (SGLang's option of that name; default: up to --max-num-batched-tokens)")
    g.add_argument("--max-waiting-requests", type=int, default=DEFAULT_MAX_WAITING_REQUESTS,
                   help="requests queued for KV pages or a batch slot at most; more are refused at once with "
                        "RESOURCE_EXHAUSTED and a retry hint (default: %(default)s)")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable the radix prefix cache")
    add_device_argument(g, "; cuda: GPU N for local rank N of an EP group on its host")
    g.add_argument("--kernels", default="auto", choices=KERNEL_CHOICES,
                   help="compute kernels: auto picks by device and dtype (onednn: bf16 weights prepacked for "
                        "the CPU's matrix units; torch: eager torch)")
    g.add_argument("--num-threads", type=int, default=None,
                   help="torch threads (default: the cores divided by --procs-per-host)")
    g.add_argument("--procs-per-host", type=int, default=1,
                   help="engine processes sharing this host's cores (`moemesh up` sets it)")
    g.add_argument("--engine-nice", type=int, default=0, metavar="N",
                   help="run the engine's thread N steps nicer (Linux), so that services sharing its cores preempt "
                        "it (`moemesh up` gives a prefill worker on the shared cores 10)")
    g.add_argument("--batch-wait-ms", type=_milliseconds, default=0.0, metavar="MS",
                   help="when idle, let the first new request wait this long for others arriving with it, so that a "
                        "burst shares one step (`moemesh up` gives a prefill worker a few ms; default: none)")
    g.add_argument("--no-warmup", action="store_true",
                   help="take requests without first running the warm-up forwards (a prefill of a typical "
                        "prompt and of a whole step, a decode batch of every size to 4): the first requests then pay "
                        "the one-time costs (5x the first prefill's time on a CPU). An EP rank never warms up.")


def _milliseconds(text: str) -> float:
    """A non-negative count of milliseconds, at most a second (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of milliseconds: {text!r}") from None
    if not 0 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be 0 to 1000 ms, got {text}")
    return value


def _tokens(text: str) -> int:
    """A non-negative count of tokens (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count of tokens: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, dtype=args.dtype, page_size=args.page_size, kv_cache_mb=args.kv_cache_mb,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens or default_batched_tokens(args.device),
        max_prefill_tokens=args.max_prefill_tokens or None,
        enable_prefix_caching=not args.no_prefix_caching,
        num_threads=args.num_threads or cpus.default_threads(args.procs_per_host), device=device_of(args),
        max_waiting_requests=args.max_waiting_requests, kernels=args.kernels)


def device_of(args: argparse.Namespace) -> str:
    """The torch device of this process: with plain `cuda` an EP rank takes the GPU of its local rank on its host
    (ranks are laid out node by node); `cuda:N` is taken as given."""
    if args.device != "cuda":
        return args.device
    ep_size, nnodes = getattr(args, "ep_size", 1), getattr(args, "nnodes", 1)
    rank = getattr(args, "ep_rank", None) or 0
    return f"cuda:{rank % max(1, ep_size // nnodes)}"


def default_batched_tokens(device: str) -> int:
    """Prompt tokens per prefill step when not given. On a CPU a step of 512 tokens already runs a V3-shaped
    layer's matmuls near the matrix units' peak, and a burst of prompts then reaches decode in several short
    steps instead of a few long ones: measured on the compute-bound benchmark shape (docs/benchmarks.md), 512
    against 2048 gave 1.1-1.3x the output tokens/s, half the mean TTFT and a lower p99 TTFT."""
    return 512 if device == "cpu" else 2048
