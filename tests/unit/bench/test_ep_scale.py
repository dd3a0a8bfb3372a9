"""`moemesh bench ep-scale`: what each rank must hold, counted from the checkpoint's own files."""

from __future__ import annotations

from pathlib import Path

import torch

from moemesh.bench.ep_scale import peak_rss, rank_shares
from moemesh.model.config import ModelConfig
from moemesh.model.streamed_checkpoint import write_streamed_checkpoint
from moemesh.model.tiny import tiny_config
from moemesh.model.weights import checkpoint_shapes, expert_of
from tests.fp8_checkpoint import FP8_SMALL


def test_a_ranks_share_is_the_dense_weights_plus_its_fp8_experts(tmp_path: Path) -> None:
    path = write_streamed_checkpoint(tmp_path, tiny_config(**FP8_SMALL, torch_dtype="bfloat16"), seed=1,
                                     shard_bytes=100_000, tokenizer=False)
    cfg = ModelConfig.from_dir(path)
    shapes = checkpoint_shapes(cfg)
    d, inter = cfg.hidden_size, cfg.moe_intermediate_size
    # One expert in FP8: its three matrices at a byte per weight, plus a float32 scale per 128 x 128 block.
    expert = 3 * d * inter + 4 * (1 * 2 + 1 * 2 + 2 * 1)
    router = sum(torch.Size(s).numel() for n, s in shapes.items() if n.endswith(("gate.weight", "correction_bias")))
    dense = sum(torch.Size(s).numel() for n, s in shapes.items() if expert_of(n) is None) * 2 + router * 2
    moe_layers = cfg.num_moe_layers
    assert rank_shares(path, 1) == [dense + moe_layers * 8 * expert]
    assert rank_shares(path, 2) == [dense + moe_layers * 4 * expert] * 2


def test_peak_rss_reads_this_process() -> None:
    import os

    held = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB touched
    assert peak_rss(os.getpid()) >= held.numel()
