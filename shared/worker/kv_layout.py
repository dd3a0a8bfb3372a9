"""A worker's KV layout (`moemesh.transfer.layout.KvLayout`) from its model and dtype, and the model fingerprint
inside it: the torch side of the layout, which the gateway and kvtransfer never need."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from moemesh.model.config import ModelConfig
from moemesh.transfer.layout import KvLayout
from moemesh.v1 import common_pb2

# The KV cache's torch dtype -> its name in the layout (the proto's KvDtype).
KV_DTYPES = {
    torch.float32: "KV_DTYPE_FLOAT32",
    torch.bfloat16: "KV_DTYPE_BFLOAT16",
    torch.float16: "KV_DTYPE_FLOAT16",
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
    """This worker's `KvLayout` (pages of `page_size` tokens of `dtype`), in the form registration and the
    kvtransfer handshakes carry."""
    return KvLayout(
        model_fingerprint=model_fingerprint(model_dir, cfg, dtype), num_layers=cfg.num_hidden_layers,
        page_size_tokens=page_size, kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
        dtype=KV_DTYPES[dtype]).to_proto()
