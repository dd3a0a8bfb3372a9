"""A worker's KV layout as the handshakes carry it, and the model fingerprint inside it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from moemesh.model.config import ModelConfig
from moemesh.v1 import common_pb2

KV_DTYPES = {
    torch.float32: common_pb2.KV_DTYPE_FLOAT32,
    torch.bfloat16: common_pb2.KV_DTYPE_BFLOAT16,
    torch.float16: common_pb2.KV_DTYPE_FLOAT16,
}


def model_fingerprint(model_dir: Path, cfg: ModelConfig, dtype: torch.dtype) -> str:
    """Equal for two workers only when they serve the same architecture, weights files and dtype.

    Hashing every weight byte would take minutes for a real checkpoint; file names and sizes with the
    full config identify a checkpoint in practice, and the dtype decides the KV rows' bytes.
    """
    h = hashlib.sha256()
    h.update(json.dumps(cfg.fingerprint_dict(), sort_keys=True, default=str).encode())
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    h.update(str(dtype).encode())
    return h.hexdigest()[:32]


def kv_layout(model_dir: Path, cfg: ModelConfig, dtype: torch.dtype, page_size: int) -> common_pb2.KvLayout:
    return common_pb2.KvLayout(
        model_fingerprint=model_fingerprint(model_dir, cfg, dtype), num_layers=cfg.num_hidden_layers,
        page_size_tokens=page_size, kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
        dtype=KV_DTYPES[dtype])
