"""Writing a random checkpoint too large to hold in memory: tensor by tensor, in shards, FP8 as DeepSeek ships.

Each tensor is drawn from its own generator (seeded by the checkpoint seed and its name), converted, and written
out with its shard once the shard is full, so memory holds one shard at a time. Linear weights are quantized to
e4m3 with a float32 scale per 128 x 128 block (`NAME_scale_inv`), as DeepSeek-V3's files are; embeddings, norms,
the head and the router stay in the config's dtype (the router's bias in float32).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from moemesh.model.config import ModelConfig
from moemesh.model.fp8 import quantize_blocks
from moemesh.model.tiny_tokenizer import build_tiny_tokenizer
from moemesh.model.weights import checkpoint_shapes

FP8_BLOCK = (128, 128)
QUANTIZATION = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(FP8_BLOCK)}


def _quantized(name: str) -> bool:
    """The tensors DeepSeek-V3 ships in FP8: every projection of attention and of the MLPs and experts."""
    return name.endswith("proj.weight") or name.endswith("kv_a_proj_with_mqa.weight")


def _draw(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A random tensor for `name`, float32, the same whatever else the checkpoint holds."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if name.endswith("e_score_correction_bias"):
        return (torch.rand(shape, generator=g) - 0.5) * 0.2
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    # Scaled by fan-in so that activations stay O(1) through wide layers (a fixed spread blows up at 7168).
    std = 0.1 if len(shape) < 2 else min(0.1, shape[-1] ** -0.5)
    return torch.randn(shape, generator=g) * std


def write_streamed_checkpoint(out_dir: str | Path, config: dict[str, Any], seed: int = 0, fp8: bool = True,
                              shard_bytes: int = 2 * 2**30, tokenizer: bool = True) -> Path:
    """Write config.json, sharded safetensors with an index, and the tokenizer; peak memory about one shard."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {**config, "quantization_config": QUANTIZATION} if fp8 else dict(config)
    cfg = ModelConfig.from_hf_dict(config)
    dtype = getattr(torch, cfg.torch_dtype.replace("torch.", ""))
    shapes = checkpoint_shapes(cfg)
    total = sum(torch.Size(s).numel() * (1 if fp8 and _quantized(n) else dtype.itemsize) for n, s in shapes.items())
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    files: list[str] = []

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        files.append(name)
        shard.clear()

    size = 0
    with tqdm(total=total, desc="Writing weights", unit="B", unit_scale=True, disable=None, leave=False) as bar:
        for name, shape in shapes.items():
            t = _draw(name, shape, seed)
            if fp8 and _quantized(name):
                shard[name], shard[name + "_scale_inv"] = quantize_blocks(t, FP8_BLOCK)
            else:
                shard[name] = t.to(torch.float32 if name.endswith("e_score_correction_bias") else dtype)
            added = shard[name].numel() * shard[name].element_size()
            size += added
            bar.update(added)
            if size >= shard_bytes:
                flush()
                size = 0
        if shard:
            flush()
    # Real checkpoints name shards "-of-N"; the count is known only now.
    renamed = {f: f.replace(".safetensors", f"-of-{len(files):05d}.safetensors") for f in files}
    for old, new in renamed.items():
        (out / old).rename(out / new)
    index = {"metadata": {"total_size": total}, "weight_map": {n: renamed[f] for n, f in weight_map.items()}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}, indent=2) + "\n")
    if tokenizer:
        build_tiny_tokenizer(out, vocab_size=config["vocab_size"])
    return out
