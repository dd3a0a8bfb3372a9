"""Engine throughput against Hugging Face `generate`, side by side in one process.

Both run greedy, on the same checkpoint, the same random prompts and the same torch thread count,
in float32. Decode runs time whole generations of short prompts (so prefill is a small part);
prefill runs time one step over long prompts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moemesh.bench.timing import best_time


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Skip the first ids: the special tokens live there and EOS would end a run early on HF's side.
    return torch.randint(8, vocab, (n, length), generator=g).tolist()


def _engine_runner(model_dir: Path, max_len: int, device: str):
    from moemesh.engine.engine import Engine, EngineConfig
    from moemesh.engine.sampling_params import SamplingParams

    # Prefix caching off: repeated timed runs of the same prompts must not get cheaper.
    engine = Engine(EngineConfig(model=str(model_dir), dtype="float32", enable_prefix_caching=False,
                                 max_num_batched_tokens=8192, max_num_seqs=256, kv_cache_mb=1024, device=device))

    def run(prompts: list[list[int]], new_tokens: int) -> None:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        outs = engine.generate(prompts, params)
        assert all(len(o.token_ids) == new_tokens for o in outs)

    return run


def _hf_runner(model_dir: Path, device: str):
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise SystemExit("the Hugging Face reference needs transformers: pip install 'moemesh[test]'") from None
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()

    @torch.inference_mode()
    def run(prompts: list[list[int]], new_tokens: int) -> None:
        ids = torch.tensor(prompts, device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + new_tokens

    return run


def bench_model(model_dir: Path, args: argparse.Namespace) -> list[dict]:
    from moemesh.model.config import ModelConfig

    cfg = ModelConfig.from_dir(model_dir)
    runners = {"moemesh": _engine_runner(model_dir, args.prefill_len + args.output_len, args.device)}
    if not args.no_hf:
        runners["hf"] = _hf_runner(model_dir, args.device)
    rows = []
    cases = [("decode", b, args.prompt_len, args.output_len) for b in _ints(args.batch_sizes)]
    cases.append(("prefill", args.prefill_batch, args.prefill_len, 1))
    for kind, batch, plen, new in cases:
        prompts = _prompts(batch, plen, cfg.vocab_size, seed=batch)
        row = {"model": model_dir.name, "kind": kind, "batch": batch, "prompt_len": plen, "new_tokens": new}
        for name, run in runners.items():
            run(prompts[:1], 2)  # warm-up: first-call allocations and lazy initialisation
            t = best_time(lambda run=run, prompts=prompts, new=new: run(prompts, new), args.repeats)
            tokens = batch * (new if kind == "decode" else plen)
            row[f"{name}_tok_s"] = tokens / t
        if "hf_tok_s" in row:
            row["ratio"] = row["moemesh_tok_s"] / row["hf_tok_s"]
        rows.append(row)
        _print_row(row)
    return rows


def _print_row(row: dict) -> None:
    what = (f"decode  batch {row['batch']:>3}" if row["kind"] == "decode"
            else f"prefill {row['batch']}x{row['prompt_len']}")
    line = f"{row['model']:<16} {what:<18} moemesh {row['moemesh_tok_s']:>9.1f} tok/s"
    if "hf_tok_s" in row:
        line += f"   hf {row['hf_tok_s']:>9.1f} tok/s   ratio {row['ratio']:>5.2f}x"
    print(line, flush=True)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def run(args: argparse.Namespace) -> int:
    from moemesh.model.default import default_model_dir

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, greedy, "
          f"decode: {args.prompt_len}-token prompts, {args.output_len} new tokens; "
          f"prefill: {args.prefill_batch} x {args.prefill_len}-token prompts", flush=True)
    dirs = [Path(args.model)] if args.model else [default_model_dir(preset=p) for p in args.presets.split(",")]
    rows = []
    for d in dirs:
        rows += bench_model(d, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0
