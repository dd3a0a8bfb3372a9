"""Fixtures of the EP unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.distributed as dist


@pytest.fixture
def gloo_world(tmp_path: Path) -> Iterator[None]:
    """A one-rank gloo group in this process (a dispatcher needs an initialized group to exist). Its rendezvous
    is a file: a free TCP port picked beforehand could be taken by another process before the store bound it."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
