"""Fixtures of the EP unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch.distributed as dist

from tests.net import free_port


@pytest.fixture
def gloo_world() -> Iterator[None]:
    """A one-rank gloo group in this process (a dispatcher needs an initialized group to exist)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
