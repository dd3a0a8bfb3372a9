"""`moemesh bench serve`: online serving benchmark of any OpenAI-compatible server, over HTTP streaming.

In the spirit of `vllm bench serve` and `python -m sglang.bench_serving`, so that moemesh's REST
facade, vLLM and SGLang can be measured by one client, with one tokenizer and the same prompts:

    moemesh bench serve --url http://127.0.0.1:8000 --input-len 128 --output-len 64 \\
        --num-prompts 16 --max-concurrency 4 --ignore-eos --result-json moemesh.json --label moemesh
    moemesh bench plot moemesh.json vllm.json --out serve.png

Requests are sent as Poisson arrivals at `--request-rate` (all at once for `inf`), at most
`--max-concurrency` in flight; each streams (`stream: true`), greedy unless `--temperature`, with
`max_tokens` = the output length and, with `--ignore-eos`, exactly that many tokens. `--warmup`
requests (other random prompts) run first and are not measured. Prompts are counted with the model's
tokenizer (`--tokenizer`, default: the `--model` folder, else the folder the server reports as the model's
`root` in /v1/models, as moemesh, vLLM and SGLang do); the server's `usage` is checked against those counts.
When neither names a tokenizer folder on this machine the run stops and says so: counting with another
tokenizer than the server's would make every length wrong, silently.

What is measured and how it is aggregated: see `bench/serve_metrics.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


def add_parsers(bsub: argparse._SubParsersAction) -> None:
    """Add `bench serve` and `bench plot` to the `moemesh bench` subcommands."""
    s = bsub.add_parser("serve", help="online serving benchmark of an OpenAI-compatible server (HTTP streaming)",
                        description=__doc__.split("\n\n")[0] + " TTFT, ITL, TPOT, end-to-end latency, "
                                    "throughput and goodput; a table, a JSON result and latency CDFs.")
    add_arguments(s)
    s.set_defaults(func=run)
    p = bsub.add_parser("plot", help="overlay `bench serve` results: latency CDFs and throughput bars",
                        description="Plot the TTFT, ITL and end-to-end latency CDFs and the throughput of one "
                                    "or more `moemesh bench serve --result-json` files into one PNG, and print "
                                    "them side by side with ratios to the first.")
    p.add_argument("results", nargs="+", metavar="RESULT.json")
    p.add_argument("--out", default=None, metavar="FILE.png", help="the PNG to write (default: only the table)")
    p.add_argument("--labels", default=None, help="comma-separated names for the runs (default: their labels)")
    p.add_argument("--title", default=None)
    p.set_defaults(func=run_plot)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL (a trailing /v1 is fine)")
    p.add_argument("--endpoint", default="/v1/completions", choices=ENDPOINTS)
    p.add_argument("--model", default=None, help="the model name to send (default: the first of GET /v1/models)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer folder that counts tokens and builds prompts (default: --model if a folder, "
                        "else the folder the server reports as the model's root in GET /v1/models)")
    p.add_argument("--dataset", default="random", metavar="random|FILE.jsonl",
                   help="random prompts, or a JSONL file (`prompt`, `messages` or `conversations` per line)")
    p.add_argument("--prompt-format", default="text", choices=["text", "ids"],
                   help="random prompts as text (fair across servers) or as token-id lists (completions only)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens as the server sees them (random)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens per request")
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="random lengths drawn uniformly within +-ratio of --input-len/--output-len")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--request-rate", default="inf", help="requests per second, Poisson arrivals; inf: all at once")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no cap)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests before the run")
    p.add_argument("--ignore-eos", action="store_true", help="ask for exactly --output-len tokens (vLLM extra)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--extra-body", default=None, metavar="JSON", help="extra fields merged into every request body")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the arrival times")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT at most this")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT at most this")
    p.add_argument("--slo-e2e-ms", type=float, default=None, help="goodput: end-to-end latency at most this")
    p.add_argument("--percentiles", default="90,99", help="percentiles to print (the JSON has 50,90,99 too)")
    p.add_argument("--result-json", default=None, metavar="FILE", help="write config, aggregates and per-request data")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw latency CDFs (needs matplotlib)")
    p.add_argument("--label", default=None, help="the run's name in tables and plots (default: the server's host)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as a Bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--wait", type=float, default=0, metavar="S", help="wait up to S seconds for GET /v1/models")
    p.add_argument("--request-timeout", type=float, default=600, help="seconds one request may take")
    p.add_argument("--timeout", type=float, default=3600, help="seconds the whole measured run may take")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
    except ValueError as e:
        print(f"moemesh bench serve: error: {e}", file=sys.stderr)
        return 2
    try:
        import httpx  # noqa: F401
    except ImportError:
        print("moemesh bench serve: error: needs httpx (pip install httpx)", file=sys.stderr)
        return 2
    return asyncio.run(_main(args, config))


def _config(args: argparse.Namespace) -> dict[str, Any]:
    rate = float(args.request_rate)
    if not rate > 0:
        raise ValueError(f"--request-rate must be > 0 or inf, got {args.request_rate}")
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        raise ValueError("--num-prompts, --input-len and --output-len must be >= 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    if args.prompt_format == "ids" and args.endpoint != "/v1/completions":
        raise ValueError("--prompt-format ids needs --endpoint /v1/completions")
    extra = json.loads(args.extra_body) if args.extra_body else {}
    if not isinstance(extra, dict):
        raise ValueError("--extra-body must be a JSON object")
    base = args.url.rstrip("/")
    base = base[:-3] if base.endswith("/v1") else base
    percentiles = sorted({50.0, 90.0, 99.0} | {float(x) for x in args.percentiles.split(",") if x.strip()})
    if any(not 0 <= q <= 100 for q in percentiles):
        raise ValueError("--percentiles must be within 0..100")
    return {
        "base_url": base, "endpoint": args.endpoint, "url": base + args.endpoint, "dataset": args.dataset,
        "prompt_format": args.prompt_format, "input_len": args.input_len, "output_len": args.output_len,
        "range_ratio": args.range_ratio, "num_prompts": args.num_prompts,
        "request_rate": rate if math.isfinite(rate) else "inf", "max_concurrency": args.max_concurrency,
        "warmup": args.warmup, "ignore_eos": args.ignore_eos, "temperature": args.temperature,
        "extra_body": extra, "seed": args.seed, "percentiles": percentiles,
        "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms, "e2e_ms": args.slo_e2e_ms},
        "request_timeout_s": args.request_timeout, "timeout_s": args.timeout,
    }


def _tokenizer_dir(args: argparse.Namespace, cards: list[dict[str, Any]]) -> Path:
    """The folder whose tokenizer builds and counts the prompts: --tokenizer; else --model if it is a folder
    here; else the `root` the server reports for its model in GET /v1/models (`cards`). ValueError, saying what
    was found, when none of them is a tokenizer folder here."""
    if args.tokenizer:
        if not _has_tokenizer(args.tokenizer):
            raise ValueError(f"--tokenizer {args.tokenizer}: no tokenizer.json there")
        return Path(args.tokenizer)
    if args.model and _has_tokenizer(args.model):
        return Path(args.model)
    card = next((c for c in cards if c["id"] == args.model), None) if args.model else None
    if card is None and cards and (not args.model or len(cards) == 1):
        card = cards[0]  # the one sent (the first), or the only one (--model being another name of it)
    if card is None:
        listed = ", ".join(repr(c["id"]) for c in cards)
        why = (f"GET /v1/models lists no model {args.model!r} (it lists {listed})" if cards
               else "GET /v1/models gave no model to take it from")
        raise ValueError(f"no tokenizer to count tokens with: {why}; pass --tokenizer DIR")
    root = card.get("root")
    if isinstance(root, str) and root:
        if _has_tokenizer(root):
            return Path(root)
        raise ValueError(f"the server serves {card['id']!r} from {root}, which is no tokenizer folder on this "
                         f"machine (no {Path(root) / 'tokenizer.json'}); pass --tokenizer DIR with the same "
                         "tokenizer")
    if _has_tokenizer(card["id"]):  # a server without `root` that names its model after the folder
        return Path(card["id"])
    raise ValueError(f"the server reports no folder (`root`) for its model {card['id']!r} in GET /v1/models; "
                     "pass --tokenizer DIR with its tokenizer")


def _has_tokenizer(folder: str) -> bool:
    return Path(folder, "tokenizer.json").is_file()


async def _main(args: argparse.Namespace, config: dict[str, Any]) -> int:
    import httpx

    from moemesh.bench.serve_client import get_model_cards, wait_ready
    from moemesh.bench.serve_data import PromptMaker
    from moemesh.model.tokenizer import Tokenizer

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.request_timeout, connect=min(30.0, args.request_timeout))
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        cards: list[dict[str, Any]] = []
        if args.wait > 0:
            try:
                cards = await wait_ready(client, config["base_url"], args.wait, headers)
            except TimeoutError as e:
                print(f"moemesh bench serve: error: {e}", file=sys.stderr)
                return 2
        else:
            try:
                cards = await get_model_cards(client, config["base_url"], headers)
            except (httpx.HTTPError, ValueError) as e:
                if not args.model:
                    print(f"moemesh bench serve: warning: GET /v1/models failed ({e}); sending no model name",
                          file=sys.stderr)
        served = [c["id"] for c in cards]
        model = args.model or (served[0] if served else None)
        try:
            tok_dir = _tokenizer_dir(args, cards)
            maker = PromptMaker(Tokenizer.from_dir(tok_dir), chat="chat" in args.endpoint,
                                ids=args.prompt_format == "ids")
            if args.dataset == "random":
                prompts = maker.random(args.num_prompts, args.input_len, args.output_len, args.seed, args.range_ratio)
            else:
                prompts = maker.from_jsonl(args.dataset, args.num_prompts, args.output_len)
            # Other prompts than the measured ones, so that no measured request hits a warm prefix cache.
            warm = maker.random(args.warmup, args.input_len, args.output_len, args.seed + 1_000_003)
        except (ValueError, OSError) as e:
            print(f"moemesh bench serve: error: {e}", file=sys.stderr)
            return 2
        config.update(model=model, served_models=served, tokenizer=str(tok_dir))
        label = args.label or config["base_url"].split("//", 1)[-1]
        print(f"bench serve [{label}]: {len(prompts)} prompts to {config['url']} (model {model}), "
              f"tokenizer {tok_dir}", file=sys.stderr, flush=True)
        runner = _Runner(client, config, headers, maker.count_output)
        if warm:
            warm_results, _ = await runner.run(warm, progress=False, rate=math.inf, timeout_s=args.timeout)
            if not any(r.success for r in warm_results):
                print(f"moemesh bench serve: error: every warm-up request failed: {warm_results[0].error}",
                      file=sys.stderr)
                return 1
        results, duration = await runner.run(prompts, progress=not args.disable_tqdm,
                                              rate=float(args.request_rate), timeout_s=args.timeout)
    return _report(args, config, label, results, duration)


class _Runner:
    def __init__(self, client: Any, config: dict[str, Any], headers: dict[str, str] | None, count: Any) -> None:
        self.client, self.config, self.headers, self.count = client, config, headers, count

    async def run(self, prompts: list[Any], progress: bool, rate: float, timeout_s: float) -> tuple[list[Any], float]:
        """Send every prompt (Poisson arrivals at `rate`, at most max_concurrency in flight); returns the
        results in prompt order and the duration (first send to last end)."""
        import random

        from moemesh.bench.serve_client import build_payload, send_request
        from moemesh.bench.serve_metrics import RequestResult

        cfg = self.config
        results = [RequestResult(prompt_len=p.prompt_len, output_len=p.output_len) for p in prompts]
        sem = asyncio.Semaphore(cfg["max_concurrency"]) if cfg["max_concurrency"] else None
        bar = None
        if progress:
            try:
                from tqdm import tqdm
            except ImportError:  # the bar is a nicety
                tqdm = None
            if tqdm is not None:
                bar = tqdm(total=len(prompts), file=sys.stderr, desc="requests", unit="req", dynamic_ncols=True)
        arrivals = random.Random(cfg["seed"])
        t0 = time.perf_counter()
        ends: list[float] = []

        async def one(i: int) -> None:
            p = prompts[i]
            payload = build_payload(cfg["endpoint"], p.prompt, p.output_len, model=cfg["model"],
                                    ignore_eos=cfg["ignore_eos"], temperature=cfg["temperature"],
                                    extra=cfg["extra_body"])
            if sem is not None:
                await sem.acquire()
            try:
                await send_request(self.client, cfg["url"], payload, results[i], headers=self.headers,
                                   timeout_s=cfg["request_timeout_s"], count_tokens=self.count, t_zero=t0)
            finally:
                if sem is not None:
                    sem.release()
                ends.append(time.perf_counter())
                if bar is not None:
                    bar.update(1)

        tasks: list[asyncio.Task] = []

        async def dispatch() -> None:
            for i in range(len(prompts)):
                if i and math.isfinite(rate):
                    await asyncio.sleep(arrivals.expovariate(rate))
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)

        try:
            await asyncio.wait_for(dispatch(), timeout_s)
        except asyncio.TimeoutError:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for r in results:
                if not r.success and not r.error:
                    r.error = f"not finished within the run's --timeout of {timeout_s:g} s"
        finally:
            if bar is not None:
                bar.close()
        return results, (max(ends) if ends else time.perf_counter()) - t0


def _report(args: argparse.Namespace, config: dict[str, Any], label: str, results: list[Any], duration: float) -> int:
    from moemesh.bench.serve_metrics import SLO, per_request, summarize

    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms)
    summary = summarize(results, duration, slo, config["percentiles"], ignore_eos=args.ignore_eos)
    print(format_summary(label, config, summary, [float(x) for x in args.percentiles.split(",") if x.strip()]),
          flush=True)
    failed = [r for r in results if not r.success]
    for r in failed[:3]:
        print(f"failed request: {r.error}", file=sys.stderr)
    if summary["output_len_mismatches"]:
        print(f"warning: {summary['output_len_mismatches']} requests did not return exactly their max_tokens "
              "output tokens (does the server honour ignore_eos?)", file=sys.stderr)
    if summary["prompt_len_mismatches"]:
        print(f"warning: for {summary['prompt_len_mismatches']} requests the server counted other prompt tokens "
              "than the tokenizer did (another tokenizer? pass --tokenizer)", file=sys.stderr)
    doc = {"label": label, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "tool": "moemesh bench serve", "config": config, "summary": summary, "requests": per_request(results)}
    if args.result_json:
        Path(args.result_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result_json).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.result_json}", file=sys.stderr)
    if args.plot:
        from moemesh.bench.serve_plot import PlotUnavailable, plot_runs

        try:
            plot_runs([doc], args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
        except PlotUnavailable as e:
            print(f"moemesh bench serve: error: {e}", file=sys.stderr)
            return 2
    return 1 if failed else 0


def format_summary(label: str, config: dict[str, Any], s: dict[str, Any], percentiles: list[float]) -> str:
    """The result table, laid out as vLLM's and SGLang's benchmarks print theirs."""
    from moemesh.bench.serve_metrics import METRIC_NAMES, METRICS

    def row(name: str, value: Any, fmt: str = ".2f") -> str:
        text = "n/a" if value is None else (format(value, fmt) if isinstance(value, float) else str(value))
        return f"{name:<40}{text:<10}"

    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="),
             row("Label:", label), row("Endpoint:", config["url"]),
             row("Successful requests:", s["completed"]), row("Failed requests:", s["failed"]),
             row("Maximum request concurrency:", config["max_concurrency"]),
             row("Request rate configured (RPS):", config["request_rate"]),
             row("Benchmark duration (s):", s["duration_s"]),
             row("Total input tokens:", s["total_input_tokens"]),
             row("Total generated tokens:", s["total_output_tokens"]),
             row("Request throughput (req/s):", s["request_throughput"]),
             row("Output token throughput (tok/s):", s["output_throughput"]),
             row("Total token throughput (tok/s):", s["total_token_throughput"]),
             row("Mean concurrency:", s["concurrency"])]
    if s["goodput"] is not None:
        lines.append(row("Request goodput (req/s):", s["goodput"]))
    for m in METRICS:
        short = m.upper()
        lines.append("{s:{c}^50}".format(s=METRIC_NAMES[m], c="-"))
        lines.append(row(f"Mean {short} (ms):", s[f"mean_{m}_ms"]))
        lines.append(row(f"Median {short} (ms):", s[f"median_{m}_ms"]))
        for q in percentiles:
            name = str(int(q)) if float(q).is_integer() else str(q).replace(".", "_")
            lines.append(row(f"P{name} {short} (ms):", s.get(f"p{name}_{m}_ms")))
    lines.append("=" * 50)
    return "\n".join(lines)


def run_plot(args: argparse.Namespace) -> int:
    from moemesh.bench.serve_plot import PlotUnavailable, compare_table, load_runs, plot_runs

    try:
        runs = load_runs(args.results, args.labels.split(",") if args.labels else None)
    except (OSError, ValueError) as e:
        print(f"moemesh bench plot: error: {e}", file=sys.stderr)
        return 2
    print(compare_table(runs))
    if args.out:
        try:
            plot_runs(runs, args.out, title=args.title)
        except PlotUnavailable as e:
            print(f"moemesh bench plot: error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
