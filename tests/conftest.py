"""Shared fixtures: checkpoints written once per session into a temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests must never touch the user's cache of the default model.
os.environ.setdefault("MOEMESH_CACHE_DIR", str(Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / "moemesh-test-cache"))

# A small DeepSeek-V3 shape for fast tests: every code path of the real one, narrower.
SMALL = {
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 32,
    "kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default model (the real `tiny` preset), with its tokenizer."""
    from shared.model.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A narrow V3 checkpoint with the tiny tokenizer (vocab 512)."""
    from shared.model.tiny import tiny_config, write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("small"), tiny_config(**SMALL), seed=3)
