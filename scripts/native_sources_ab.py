"""Two builds of the native kernels inside the engine, interleaved: this checkout's sources against another folder's.

    mkdir -p /tmp/base && git archive REV shared/kernels | tar -x -C /tmp/base --strip-components=2
    python scripts/native_sources_ab.py --model DIR --baseline /tmp/base [--batch 4] [--prompt-len 128] [--rounds 8]

Builds both libraries, then one engine with each (weights, cache and scheduler of their own, one thread), and
generates the same prompts with each in turn, `--rounds` times: each round's prompts are fresh, so every step reads
its weights from memory as a serving step does (the other engine ran in between). Prints, per native kernel, the
median time of a call with either build, and the time of each round's generate. Checks that both builds give the
same tokens.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from moemesh.engine.engine import Engine, EngineConfig
from moemesh.engine.sampling_params import SamplingParams
from moemesh.kernels import native

BUILDS = ("baseline", "checkout")


class _Timed:
    """The library's functions, each call's time appended to `times[name]`."""

    def __init__(self, lib: ctypes.CDLL, times: dict[str, list[float]]) -> None:
        self._lib = lib
        self._times = times

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._lib, name)

        def call(*args: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args)
            self._times[name].append(time.perf_counter() - t0)
            return out

        return call


def _build(folder: Path | None) -> ctypes.CDLL:
    """The native library built from `folder`'s sources (None: this checkout's)."""
    sources, headers = native.SOURCES, native.HEADERS
    if folder is not None:
        native.SOURCES = tuple(folder / p.name for p in sources)
        native.HEADERS = tuple(folder / p.name for p in headers)
    native._load.cache_clear()
    try:
        lib, why_not = native._load()
    finally:
        native.SOURCES, native.HEADERS = sources, headers
        native._load.cache_clear()
    if lib is None:
        sys.exit(f"native kernels from {folder or 'this checkout'}: {why_not}")
    return lib


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder (bf16)")
    p.add_argument("--baseline", required=True, type=Path, help="folder with the other build's .c and .h files")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=41)
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)
    libs = {"baseline": _build(args.baseline), "checkout": _build(None)}
    times = {b: collections.defaultdict(list) for b in BUILDS}
    engines = {}
    for b in BUILDS:
        timed = _Timed(libs[b], times[b])
        native._load = lambda timed=timed: (timed, None)  # the engine's kernels take this build when installed
        engines[b] = Engine(EngineConfig(model=args.model, kv_cache_mb=1024))
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    wall: dict[str, list[float]] = {b: [] for b in BUILDS}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.rounds):
        prompts = [torch.randint(10, 1000, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
        for b in BUILDS:
            t0 = time.perf_counter()
            tokens[b] = [c.token_ids for c in engines[b].generate(prompts, params)]
            wall[b].append(time.perf_counter() - t0)
        if tokens["baseline"] != tokens["checkout"]:
            sys.exit("the two builds generated different tokens")
    print(f"{args.model}: {args.batch} x {args.prompt_len} in, {args.new_tokens} out, {args.rounds} rounds; "
          "same tokens")
    for name in sorted(times["baseline"]):
        a, b = statistics.median(times["baseline"][name]), statistics.median(times["checkout"][name])
        print(f"  {name:26s} baseline {a * 1e6:8.1f} us   checkout {b * 1e6:8.1f} us   checkout/baseline {b / a:.2f}"
              f"   ({len(times['baseline'][name])} calls)")
    for b in BUILDS:
        print(f"  generate, {b:8s}: " + " ".join(f"{w * 1e3:.0f}" for w in wall[b])
              + f" ms (median {statistics.median(wall[b]) * 1e3:.0f})")


if __name__ == "__main__":
    main()
