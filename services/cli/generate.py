"""`moemesh generate`: run prompts through the in-process engine and print the results."""

from __future__ import annotations

import argparse
import json

from moemesh.device import add_device_argument
from moemesh.kernels.backends import CHOICES as KERNEL_CHOICES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text in-process (no services)",
                       description="Run prompts through the in-process engine, batched together.")
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    add_model_args(p)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="also report the N most likely tokens at each step (--json)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=run)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options every command that loads a model shares."""
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded tiny model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--kv-cache-mb", type=int, default=512, help="memory for the paged KV cache")
    p.add_argument("--page-size", type=int, default=16)
    add_device_argument(p)
    p.add_argument("--kernels", default="auto", choices=KERNEL_CHOICES,
                   help="compute kernels: auto picks by device and dtype")


def run(args: argparse.Namespace) -> int:
    if args.model:  # a bad folder or config.json field: one line naming it (ModelConfigError), before torch loads
        from moemesh.model.config_check import check_model_dir

        check_model_dir(args.model)
    from moemesh.engine.engine import Engine, EngineConfig
    from moemesh.engine.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
        logprobs=args.logprobs if args.logprobs is not None else (0 if args.json else None))
    engine = Engine(EngineConfig(model=args.model, dtype=args.dtype, kv_cache_mb=args.kv_cache_mb,
                                 page_size=args.page_size, device=args.device, kernels=args.kernels))
    prompts = list(args.prompts)
    if args.chat:
        if engine.tokenizer is None:
            raise FileNotFoundError(f"{engine.model_dir} has no tokenizer.json: --chat needs one")
        prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    for prompt, c in zip(args.prompts, engine.generate(prompts, params), strict=True):
        if args.json:
            obj = {
                "prompt": prompt, "text": c.text, "token_ids": c.token_ids, "logprobs": c.logprobs,
                "finish_reason": c.finish_reason, "prompt_tokens": len(c.prompt_token_ids),
                "completion_tokens": len(c.token_ids),
            }
            if args.logprobs:
                obj["top_logprobs"] = [[{"token_id": t, "logprob": lp} for t, lp in step] for step in c.top_logprobs]
            print(json.dumps(obj, ensure_ascii=False))
        else:
            print(f"{prompt}{c.text}")
    return 0
