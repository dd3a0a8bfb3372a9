"""Writing test checkpoints whose linear weights are FP8 with 128 x 128 block scales, as DeepSeek-V3 ships them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moemesh.model.tiny import tiny_config, write_checkpoint
from tests.conftest import SMALL

# hidden 192 and kv_lora 160 make blocks that overhang the matrix edges, as real shapes do.
FP8_SMALL = {**SMALL, "hidden_size": 192, "kv_lora_rank": 160}
QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def quantize_block(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128x128 block: scale = amax / 448 (e4m3's max), weight = w / scale in float8."""
    o, i = w.shape
    so, si = -(-o // block), -(-i // block)
    scale = torch.zeros(so, si)
    for a in range(so):
        for b in range(si):
            blk = w[a * block:(a + 1) * block, b * block:(b + 1) * block]
            scale[a, b] = blk.abs().max().clamp(min=1e-12) / 448.0
    full = scale.repeat_interleave(block, 0)[:o].repeat_interleave(block, 1)[:, :i]
    return (w / full).to(torch.float8_e4m3fn), scale


def write_fp8_checkpoint(path: Path, seed: int = 5, **overrides: Any) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint of FP8_SMALL (plus `overrides`) with its projections quantized; -> (folder, the tensors as
    written, scales included)."""
    cfg = tiny_config(**{**FP8_SMALL, **overrides}, torch_dtype="bfloat16", quantization_config=QUANT)
    path = write_checkpoint(path, cfg, seed=seed, tokenizer=False)
    tensors = load_file(str(path / "model.safetensors"))
    for name in list(tensors):
        # As DeepSeek-V3 ships: linear weights quantized; embeddings, head, norms and router not.
        if name.endswith("proj.weight") or name.endswith("kv_a_proj_with_mqa.weight"):
            tensors[name], tensors[name + "_scale_inv"] = quantize_block(tensors[name].float())
    (path / "model.safetensors").unlink()
    save_file(tensors, str(path / "model.safetensors"))
    return path, tensors
