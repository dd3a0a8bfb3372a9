"""Where the embedded default model lives, created on first use. Torch-free until it must write one,
so that the gateway (which only needs the tokenizer) can find the folder without torch installed."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Bumped whenever the tiny model's files change, so cached copies of an older one are not reused.
TINY_VERSION = 1


def cache_root() -> Path:
    return Path(os.environ.get("MOEMESH_CACHE_DIR") or Path.home() / ".cache" / "moemesh")


def default_model_dir(seed: int = 0, preset: str = "tiny") -> Path:
    """The cached default model, created on first use (atomically, so concurrent starters agree)."""
    root = cache_root()
    target = root / f"{preset}-v{TINY_VERSION}-seed{seed}"
    if (target / "config.json").is_file():
        return target
    from moemesh.model.tiny import make_tiny

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        make_tiny(tmp, seed=seed, preset=preset)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
