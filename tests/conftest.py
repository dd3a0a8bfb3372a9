"""Shared fixtures (checkpoints written once per session into a temporary folder, certificates, the checkout's
scripts) and the kinds of test (tests/kinds.py): a marker per folder and the guards that keep the folders honest."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import pytest

from tests.kinds import guard, kind_of
from tests.paths import ROOT, load_script
from tests.pki import Pki, write_pki

# Tests must never touch the user's cache of the default model.
os.environ.setdefault("MOEMESH_CACHE_DIR", str(Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / "moemesh-test-cache"))

# A small DeepSeek-V3 shape for fast tests: every code path of the real one, narrower.
SMALL = {
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 32,
    "kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(kind_of(item.path))


@pytest.fixture(autouse=True)
def _kind_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    guard(kind_of(request.node.path), monkeypatch)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default model (the real `tiny` preset), with its tokenizer."""
    from moemesh.model.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A narrow V3 checkpoint with the tiny tokenizer (vocab 512)."""
    from moemesh.model.tiny import tiny_config, write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("small"), tiny_config(**SMALL), seed=3)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, the mesh's server and client certificates, and a rogue client's (tests/pki.py)."""
    return write_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def vd() -> ModuleType:
    """scripts/validate_deploy.py, the offline validation of the deployment files."""
    return load_script("validate_deploy", ROOT / "scripts" / "validate_deploy.py")


@pytest.fixture(scope="session")
def probe() -> ModuleType:
    """deploy/healthcheck.py, the containers' health probe."""
    return load_script("moemesh_healthcheck", ROOT / "deploy" / "healthcheck.py")
