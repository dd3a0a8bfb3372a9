"""End-to-end serving speed of the mesh against the in-process engine, side by side in one run.

Setups (`--setups`):
  engine     an `AsyncEngine` in this process (the engine on its own thread, continuous batching)
  colocated  `moemesh up --prefill 0 --decode 1`: the decode worker prefills itself
  pd-relay   `moemesh up --prefill 1 --decode 1 --transfer relay`: KV through kvtransfer's gRPC relay
  pd-ucx     `moemesh up --prefill 1 --decode 1 --transfer ucx`: KV over UCX, prefill to decode directly

Every setup gets the same requests: random token-id prompts of `--input-len` tokens, greedy, `ignore_eos`,
exactly `--output-len` new tokens. Each concurrency level has its own prompts (so no level hits the
prefix cache with an earlier level's prompts) and keeps that many requests in flight (a semaphore) until
all of its prompts are done. A mesh starts once per setup, is warmed up, runs every level, gets a
short direct-to-worker probe (the TTFT without the gateway, and prefill's own timings in PD mode), and
is stopped, with its processes checked gone, before the next one starts.

Per request: TTFT = first chunk carrying tokens minus the moment the request was sent (after it got
its semaphore slot); end-to-end latency; the gaps between consecutive token-carrying chunks (ITL).
Per level: output tokens/s = all output tokens / the level's wall time (first send to last end).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from moemesh.service.launch import MeshProcess, start_mesh

# `moemesh up` options of each mesh setup; "engine" runs in this process.
MESH_SETUPS: dict[str, list[str]] = {
    "colocated": ["--prefill", "0", "--decode", "1"],
    "pd-relay": ["--prefill", "1", "--decode", "1", "--transfer", "relay"],
    "pd-ucx": ["--prefill", "1", "--decode", "1", "--transfer", "ucx"],
}
SETUPS = ["engine", *MESH_SETUPS]

# One request, given its prompt: yields (new output token ids, cached prompt tokens or None) per chunk.
Stream = Callable[[list[int]], AsyncIterator[tuple[list[int], "int | None"]]]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of: {', '.join(SETUPS)}")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated requests in flight per level")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="requests per concurrency level (default: max(2 x concurrency, 8))")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (random token ids)")
    p.add_argument("--output-len", type=int, default=64, help="generated tokens per request (ignore_eos)")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded tiny model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests per setup before the levels")
    p.add_argument("--probe", type=int, default=5,
                   help="direct-to-worker requests per mesh setup for the TTFT breakdown (0: none)")
    p.add_argument("--request-timeout", type=float, default=300, help="seconds one request may take")
    p.add_argument("--level-timeout", type=float, default=1200, help="seconds one concurrency level may take")
    p.add_argument("--ready-timeout", type=float, default=300, help="seconds a mesh may take to start")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")


# ---- workload ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    input_len: int
    output_len: int
    levels: list[int]
    prompts: dict[int, list[list[int]]]   # concurrency -> its prompts
    warmup: list[list[int]]
    probe: list[list[int]]


def make_workload(args: argparse.Namespace, vocab: int) -> Workload:
    levels = _ints(args.concurrency)
    if not levels or min(levels) < 1:
        raise SystemExit(f"moemesh bench mesh: --concurrency needs positive integers, got {args.concurrency!r}")

    def prompts(n: int, name: str) -> list[list[int]]:
        # A string seed per set: distinct sets never share a prompt (hence never a cached prefix).
        rng = random.Random(f"moemesh-bench-mesh:{args.seed}:{name}")
        # The first ids are special tokens (BOS, EOS...): keep prompts to ordinary ones.
        return [[rng.randrange(8, vocab) for _ in range(args.input_len)] for _ in range(n)]

    return Workload(
        input_len=args.input_len, output_len=args.output_len, levels=levels,
        prompts={c: prompts(args.num_prompts or max(2 * c, 8), f"level-{c}") for c in levels},
        warmup=prompts(args.warmup, "warmup"),
        probe=prompts(args.probe + 1, "probe") if args.probe > 0 else [])  # the first probe warms the channels up


# ---- measuring ---------------------------------------------------------------------------------


@dataclass
class Sample:
    """One request's timings (seconds, from the moment it was sent)."""

    ok: bool
    error: str = ""
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    tokens: int = 0
    gaps_s: list[float] = field(default_factory=list)
    cached: int = 0
    token_ids: list[int] = field(default_factory=list)


async def timed(stream: Stream, prompt: list[int], expected: int, timeout_s: float) -> Sample:
    """Run one request, timing its chunks; never raises (a failure is a Sample with ok=False)."""
    t0 = time.perf_counter()
    s = Sample(ok=True)
    last: float | None = None

    async def consume() -> None:
        nonlocal last
        async with contextlib.aclosing(stream(prompt)) as chunks:
            async for new, cached in chunks:
                if cached is not None:
                    s.cached = cached
                if not new:
                    continue
                s.token_ids.extend(new)
                now = time.perf_counter()
                if last is None:
                    s.ttft_s = now - t0
                else:
                    s.gaps_s.append(now - last)
                last = now
                s.tokens += len(new)

    try:
        await asyncio.wait_for(consume(), timeout_s)
    except asyncio.TimeoutError:
        return Sample(ok=False, error=f"no end after {timeout_s:g} s")
    except Exception as e:  # a failed request is a result to report, not a reason to stop
        return Sample(ok=False, error=f"{type(e).__name__}: {e}")
    s.e2e_s = time.perf_counter() - t0
    if s.tokens != expected:
        return Sample(ok=False, error=f"got {s.tokens} output tokens, expected {expected}")
    return s


@dataclass
class Level:
    concurrency: int
    samples: list[Sample]
    wall_s: float


async def run_level(stream: Stream, prompts: list[list[int]], concurrency: int, expected: int,
                    request_timeout_s: float, level_timeout_s: float) -> Level:
    sem = asyncio.Semaphore(concurrency)

    async def one(prompt: list[int]) -> Sample:
        async with sem:
            return await timed(stream, prompt, expected, request_timeout_s)

    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(one(p)) for p in prompts]
    done, pending = await asyncio.wait(tasks, timeout=level_timeout_s)
    wall = time.perf_counter() - t0
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    samples = [t.result() if t in done else Sample(ok=False, error=f"level timed out after {level_timeout_s:g} s")
               for t in tasks]
    return Level(concurrency, samples, wall)


def _pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def level_row(setup: str, lv: Level) -> dict:
    ok = [s for s in lv.samples if s.ok]
    bad = [s for s in lv.samples if not s.ok]
    ttft = [s.ttft_s * 1e3 for s in ok]
    e2e = [s.e2e_s * 1e3 for s in ok]
    gaps = [g * 1e3 for s in ok for g in s.gaps_s]
    tpot = [(s.e2e_s - s.ttft_s) * 1e3 / (s.tokens - 1) for s in ok if s.tokens > 1]
    tokens = sum(s.tokens for s in ok)
    row = {
        "setup": setup, "concurrency": lv.concurrency, "num_prompts": len(lv.samples), "ok": len(ok),
        "errors": len(bad), "wall_s": lv.wall_s, "output_tokens": tokens,
        "output_tok_s": tokens / lv.wall_s if lv.wall_s > 0 else 0.0,
        "ttft_ms_mean": _mean(ttft), "ttft_ms_p50": _pct(ttft, 50), "ttft_ms_p99": _pct(ttft, 99),
        "e2e_ms_mean": _mean(e2e), "e2e_ms_p50": _pct(e2e, 50), "e2e_ms_p99": _pct(e2e, 99),
        "itl_ms_mean": _mean(gaps), "itl_ms_p99": _pct(gaps, 99), "tpot_ms_mean": _mean(tpot),
        "cached_prompt_tokens": sum(s.cached for s in ok),
    }
    if bad:
        row["first_error"] = bad[0].error
    return row


def _print_progress(row: dict) -> None:
    err = f"   {row['errors']} failed: {row.get('first_error', '')}" if row["errors"] else ""
    print(f"  {row['setup']:<10} c={row['concurrency']:<3} {row['ok']:>3}/{row['num_prompts']:<3} ok  "
          f"{row['output_tok_s']:8.1f} tok/s  TTFT mean {row['ttft_ms_mean']:8.1f} ms  "
          f"p99 {row['ttft_ms_p99']:8.1f} ms  ITL {row['itl_ms_mean']:6.2f} ms  "
          f"(wall {row['wall_s']:.1f} s){err}", flush=True)


async def run_levels(setup: str, stream: Stream, wl: Workload, args: argparse.Namespace
                     ) -> tuple[list[dict], dict[int, list[list[int]]]]:
    """Warm-up, then every level; returns the rows and each level's output token ids (for comparison)."""
    for i, prompt in enumerate(wl.warmup):
        s = await timed(stream, prompt, wl.output_len, args.request_timeout)
        if not s.ok:
            raise RuntimeError(f"warm-up request {i} failed: {s.error}")
    rows = []
    outputs: dict[int, list[list[int]]] = {}
    for c in wl.levels:
        lv = await run_level(stream, wl.prompts[c], c, wl.output_len, args.request_timeout, args.level_timeout)
        row = level_row(setup, lv)
        _print_progress(row)
        rows.append(row)
        outputs[c] = [s.token_ids if s.ok else [] for s in lv.samples]
    return rows, outputs


# ---- the in-process engine ----------------------------------------------------------------------


def bench_engine(model_dir: Path, wl: Workload, args: argparse.Namespace
                 ) -> tuple[list[dict], dict[int, list[list[int]]]]:
    import torch

    from moemesh.engine.async_engine import AsyncEngine
    from moemesh.engine.engine import Engine, EngineConfig
    from moemesh.engine.sampling_params import SamplingParams

    # The workers' defaults (kv-cache-mb 512, max-num-seqs 64, 2048 batched tokens, prefix caching on),
    # but torch's own thread count: the whole machine, where each mesh engine gets a share of it.
    t0 = time.perf_counter()
    engine = Engine(EngineConfig(model=str(model_dir)))
    threads = torch.get_num_threads()
    print(f"  engine: loaded in {time.perf_counter() - t0:.1f} s, {threads} torch threads", flush=True)
    params = SamplingParams(max_tokens=wl.output_len, temperature=0.0, ignore_eos=True)

    async def main() -> tuple[list[dict], dict[int, list[list[int]]]]:
        aengine = AsyncEngine(engine)
        await aengine.start()

        async def stream(prompt: list[int]) -> AsyncIterator[tuple[list[int], int | None]]:
            rid = f"bench-{uuid.uuid4().hex[:12]}"
            async with contextlib.aclosing(aengine.generate(prompt, params, rid)) as outs:
                async for out in outs:
                    yield list(out.new_token_ids), out.num_cached_tokens

        try:
            return await run_levels("engine", stream, wl, args)
        finally:
            await aengine.stop()

    rows, outputs = asyncio.run(main())
    for r in rows:
        r["threads_per_engine"] = threads
    return rows, outputs


# ---- a mesh ---------------------------------------------------------------------------------------


async def wait_registered(client: object, prefill: int, decode: int, timeout_s: float) -> None:
    """Until the gateway lists the expected workers (they register just after they print their address)."""
    deadline = time.monotonic() + timeout_s
    seen = "nothing"
    while time.monotonic() < deadline:
        try:
            models = await client.list_models(timeout_s=5)
            if models:
                m = models[0]
                seen = f"{m.num_prefill_workers} prefill, {m.num_decode_workers} decode"
                if m.num_prefill_workers >= prefill and m.num_decode_workers >= decode:
                    return
        except Exception as e:
            seen = f"{type(e).__name__}: {e}"
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the workers did not register with the gateway in {timeout_s:g} s (saw {seen})")


def bench_mesh(setup: str, wl: Workload, args: argparse.Namespace
               ) -> tuple[list[dict], dict[int, list[list[int]]], dict | None]:
    """Start `moemesh up` for `setup`, run the levels and the probe against it, stop it and check its processes
    are gone. Every line the mesh writes goes to a log file, kept when anything went wrong."""
    from moemesh.sdk import AsyncMeshClient

    up_args = [*MESH_SETUPS[setup], *(["--model", args.model] if args.model else [])]
    prefill = int(up_args[up_args.index("--prefill") + 1])
    decode = int(up_args[up_args.index("--decode") + 1])
    log = tempfile.NamedTemporaryFile("w", prefix=f"moemesh-bench-{setup}-", suffix=".log", delete=False)
    mesh: MeshProcess | None = None
    failed = True
    leftovers: list[int] = []
    try:
        t0 = time.perf_counter()
        # Free ports only (gRPC and REST): other meshes may run on this host at the same time.
        mesh = start_mesh(up_args, timeout_s=args.ready_timeout, sink=log)

        async def main(mesh: MeshProcess) -> tuple[list[dict], dict[int, list[list[int]]], dict | None]:
            client = AsyncMeshClient(mesh.gateway, timeout_s=args.request_timeout)
            try:
                await wait_registered(client, prefill, decode, args.ready_timeout)
                print(f"  {setup}: mesh ready in {time.perf_counter() - t0:.1f} s "
                      f"(gateway {mesh.gateway}; logs {log.name})", flush=True)

                async def stream(prompt: list[int]) -> AsyncIterator[tuple[list[int], int | None]]:
                    chunks = client.stream(token_ids=prompt, max_tokens=wl.output_len, temperature=0.0,
                                           ignore_eos=True, timeout_s=args.request_timeout)
                    async with contextlib.aclosing(chunks) as it:
                        async for ch in it:
                            yield ch.token_ids, ch.usage.cached_prompt_tokens if ch.usage else None

                rows, outputs = await run_levels(setup, stream, wl, args)
                for r in rows:  # what `moemesh up` gives each engine (--procs-per-host)
                    r["threads_per_engine"] = max(1, (os.cpu_count() or 1) // max(1, prefill + decode))
                probe = None
                if wl.probe:
                    try:
                        probe = await asyncio.wait_for(
                            probe_workers(mesh, wl, prefill > 0, args.request_timeout),
                            args.request_timeout * (len(wl.probe) + 1))
                    except Exception as e:
                        print(f"  {setup}: the direct probe failed: {type(e).__name__}: {e}", flush=True)
                return rows, outputs, probe
            finally:
                await client.close()

        result = asyncio.run(main(mesh))
        failed = False
        return result
    except (RuntimeError, TimeoutError) as e:
        # The launcher's own errors carry the mesh's output already; the benchmark's get its last lines.
        tail = mesh.output.tail(15) if mesh is not None and "moemesh up" not in str(e) else ""
        raise RuntimeError(f"{e}{tail}") from None
    finally:
        if mesh is not None:
            code = mesh.stop()
            leftovers = mesh.kill_leftovers()
            if leftovers:
                print(f"  {setup}: WARNING: processes left after moemesh up stopped, killed: {leftovers}", flush=True)
            else:
                print(f"  {setup}: mesh stopped (moemesh up exit code {code}; "
                      f"{len(mesh.services)} service processes gone)", flush=True)
        log.close()
        if failed or leftovers or (mesh is not None and mesh.proc.returncode not in (0, None)):
            print(f"  {setup}: mesh logs kept in {log.name}", flush=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(log.name)


# ---- the direct probe: TTFT without the gateway -----------------------------------------------


async def probe_workers(mesh: MeshProcess, wl: Workload, pd: bool, timeout_s: float) -> dict:
    """Requests sent straight to the workers, one at a time, as the gateway would send them.

    Gives the TTFT without the gateway hop and, in PD mode, the prefill worker's own account of the
    time (queued, forward to the first token, KV send after it) and when its call returned.
    """
    import grpc

    from moemesh.sdk.channel import aio_channel
    from moemesh.sdk.messages import sampling_message
    from moemesh.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

    decode_addr = next(r.address for n, r in mesh.services.items() if n.startswith("decode"))
    prefill_addr = next((r.address for n, r in mesh.services.items() if n.startswith("prefill")), None)
    sampling = sampling_message(max_tokens=wl.output_len, temperature=0.0, ignore_eos=True)
    dch = aio_channel(decode_addr)
    pch = aio_channel(prefill_addr) if pd and prefill_addr else None
    rows: list[dict] = []
    try:
        dstub = decode_pb2_grpc.DecodeStub(dch)
        pstub = prefill_pb2_grpc.PrefillStub(pch) if pch is not None else None
        for i, prompt in enumerate(wl.probe):
            rid = f"bench-probe-{uuid.uuid4().hex[:12]}"
            room = uuid.uuid4().hex if pstub is not None else ""
            t0 = time.perf_counter()
            call = dstub.Generate(decode_pb2.DecodeRequest(request_id=rid, prompt_token_ids=prompt,
                                                           sampling=sampling, room_id=room), timeout=timeout_s)
            prefill_task = None
            if pstub is not None:
                async def prefill(rid: str = rid, room: str = room, prompt: list[int] = prompt
                                  ) -> tuple[object, float]:
                    resp = await pstub.Prefill(prefill_pb2.PrefillRequest(
                        request_id=rid, room_id=room, prompt_token_ids=prompt, sampling=sampling), timeout=timeout_s)
                    return resp, time.perf_counter()
                prefill_task = asyncio.ensure_future(prefill())
            first = None
            tokens = 0
            try:
                async for msg in call:
                    if msg.token_ids and first is None:
                        first = time.perf_counter()
                    tokens += len(msg.token_ids)
            except grpc.aio.AioRpcError as e:
                if prefill_task is not None:
                    prefill_task.cancel()
                raise RuntimeError(f"decode worker: {e.code().name}: {e.details()}") from None
            end = time.perf_counter()
            row = {"ttft_ms": (first - t0) * 1e3 if first else float("nan"), "e2e_ms": (end - t0) * 1e3,
                   "tokens": tokens}
            if prefill_task is not None:
                resp, returned = await prefill_task
                row.update(prefill_queue_ms=resp.queue_ns / 1e6, prefill_forward_ms=resp.forward_ns / 1e6,
                           prefill_kv_send_ms=resp.transfer_ns / 1e6, prefill_returned_ms=(returned - t0) * 1e3,
                           kv_bytes=resp.kv_bytes)
            if i > 0:  # the first one connected the channels
                rows.append(row)
    finally:
        await dch.close()
        if pch is not None:
            await pch.close()
    keys = [k for k in rows[0] if k != "tokens"]
    return {"requests": len(rows), **{k: _pct([r[k] for r in rows], 50) for k in keys}}  # medians


# ---- the run ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    import torch

    from moemesh.model.config import ModelConfig
    from moemesh.model.default import default_model_dir

    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown or not setups:
        raise SystemExit(f"moemesh bench mesh: unknown setups {unknown}; choose from {', '.join(SETUPS)}")
    if args.input_len < 1 or args.output_len < 1:
        raise SystemExit("moemesh bench mesh: --input-len and --output-len must be >= 1")
    model_dir = Path(args.model) if args.model else default_model_dir()
    cfg = ModelConfig.from_dir(model_dir)
    wl = make_workload(args, cfg.vocab_size)
    cores = os.cpu_count() or 1
    print(f"moemesh bench mesh: {model_dir.name}, {wl.input_len}-token random prompts, {wl.output_len} output "
          f"tokens (ignore_eos, greedy), concurrency {','.join(map(str, wl.levels))}, "
          f"{' / '.join(str(len(wl.prompts[c])) for c in wl.levels)} requests per level", flush=True)
    print(f"threads: {cores} cores; the in-process engine uses torch's default ({torch.get_num_threads()} "
          f"threads, the whole machine); in the mesh `moemesh up` splits the cores among the engines "
          f"(--procs-per-host): colocated 1 engine x {cores}, PD 2 engines x {max(1, cores // 2)} threads, the "
          f"decode worker alone on its cores and the other services on the rest", flush=True)
    rows: list[dict] = []
    outputs: dict[str, dict[int, list[list[int]]]] = {}
    probes: dict[str, dict] = {}
    for setup in setups:
        print(f"[{setup}]", flush=True)
        t0 = time.perf_counter()
        try:
            if setup == "engine":
                got, outs = bench_engine(model_dir, wl, args)
                gc.collect()  # the engine and its KV cache go before a mesh starts
            else:
                got, outs, probe = bench_mesh(setup, wl, args)
                if probe is not None:
                    probes[setup] = probe
            rows += got
            outputs[setup] = outs
        except Exception as e:
            print(f"  {setup}: FAILED: {type(e).__name__}: {e}", flush=True)
            rows.append({"setup": setup, "error": f"{type(e).__name__}: {e}"})
        print(f"  {setup}: {time.perf_counter() - t0:.1f} s in all", flush=True)
    _compare(rows, outputs)
    print()
    print(_table(rows))
    hits = [f"{r['setup']} c={r['concurrency']}" for r in rows if r.get("cached_prompt_tokens")]
    if hits:
        print(f"note: prompt tokens came from the prefix cache in {', '.join(hits)}; those TTFTs are flattered")
    if probes:
        print()
        print(_breakdown(rows, probes))
    if args.json:
        out = rows + [{"setup": s, "kind": "direct-probe", "concurrency": 1, **p} for s, p in probes.items()]
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if all("error" not in r and r.get("errors", 0) == 0 for r in rows) else 1


def _compare(rows: list[dict], outputs: dict[str, dict[int, list[list[int]]]]) -> None:
    """Ratios to the engine's row of the same concurrency, and whether the greedy tokens are the same."""
    base = {r["concurrency"]: r for r in rows if r.get("setup") == "engine" and "concurrency" in r}
    ref = outputs.get("engine", {})
    for r in rows:
        b = base.get(r.get("concurrency"))
        if "error" in r or b is None:
            continue
        r["tok_s_vs_engine"] = r["output_tok_s"] / b["output_tok_s"] if b["output_tok_s"] else float("nan")
        r["ttft_vs_engine"] = r["ttft_ms_mean"] / b["ttft_ms_mean"] if b["ttft_ms_mean"] else float("nan")
        mine = outputs.get(r["setup"], {}).get(r["concurrency"])
        theirs = ref.get(r["concurrency"])
        if r["setup"] != "engine" and mine and theirs:
            r["same_tokens_as_engine"] = sum(1 for a, b2 in zip(mine, theirs, strict=True) if a and a == b2)


def _table(rows: list[dict]) -> str:
    head = (f"{'setup':<10} {'conc':>4} {'ok':>7} {'out tok/s':>10} {'TTFT mean':>10} {'p50':>8} {'p99':>8} "
            f"{'ITL mean':>9} {'tok/s':>7} {'TTFT':>7} {'same':>7}")
    sub = (f"{'':<10} {'':>4} {'':>7} {'':>10} {'ms':>10} {'ms':>8} {'ms':>8} {'ms':>9} "
           f"{'/engine':>7} {'/engine':>7} {'tokens':>7}")
    out = [head, sub]
    for r in rows:
        if "error" in r:
            out.append(f"{r['setup']:<10} FAILED: {r['error'].splitlines()[0]}")
            continue
        def ratio(key: str, r: dict = r) -> str:
            return f"{r[key]:6.2f}x" if key in r else f"{'-':>7}"
        same = (f"{r['same_tokens_as_engine']}/{r['ok']}" if "same_tokens_as_engine" in r else "-")
        out.append(f"{r['setup']:<10} {r['concurrency']:>4} {str(r['ok']) + '/' + str(r['num_prompts']):>7} "
                   f"{r['output_tok_s']:>10.1f} {r['ttft_ms_mean']:>10.1f} {r['ttft_ms_p50']:>8.1f} "
                   f"{r['ttft_ms_p99']:>8.1f} {r['itl_ms_mean']:>9.2f} {ratio('tok_s_vs_engine')} "
                   f"{ratio('ttft_vs_engine')} {same:>7}")
    return "\n".join(out)


def _breakdown(rows: list[dict], probes: dict[str, dict]) -> str:
    """TTFT at concurrency 1 through the gateway against straight to the workers, with prefill's timings."""
    at1 = {r["setup"]: r for r in rows if r.get("concurrency") == 1 and "error" not in r}
    out = ["TTFT at concurrency 1, medians in ms. direct: requests sent straight to the worker(s) as the gateway "
           "sends them (no gateway); prefill's times are from its own response (queue_ns, forward_ns, transfer_ns)"]
    if "engine" in at1:
        out.append(f"  {'engine':<10} in-process {at1['engine']['ttft_ms_p50']:7.1f}")
    for setup, p in probes.items():
        via = at1.get(setup, {}).get("ttft_ms_p50")
        line = f"  {setup:<10} direct {p['ttft_ms']:7.1f}"
        if via is not None:
            line += f"   via gateway {via:7.1f}   gateway hop {via - p['ttft_ms']:+.1f}"
        out.append(line)
        if "prefill_forward_ms" in p:
            out.append(f"  {'':<10} prefill worker: first KV rows after {p['prefill_queue_ms']:.1f} (queue + forward), "
                       f"first token +{p['prefill_forward_ms']:.1f}, KV sent +{p['prefill_kv_send_ms']:.1f} after it "
                       f"({p['kv_bytes'] / 2**10:.0f} KiB); its call returned at {p['prefill_returned_ms']:.1f}, "
                       f"decode's first token at {p['ttft_ms']:.1f} ({p['ttft_ms'] - p['prefill_returned_ms']:+.1f})")
    return "\n".join(out)


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"moemesh bench mesh: expected comma-separated integers, got {s!r}") from None
