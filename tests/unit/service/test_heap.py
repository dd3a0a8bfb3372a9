"""The serving process's heap: settled (collected, then frozen out of later collections) once the service is ready."""

from __future__ import annotations

import asyncio
import gc

import pytest

from moemesh.service import heap


@pytest.fixture(autouse=True)
def _unfreeze():
    gc.unfreeze()
    yield
    gc.unfreeze()  # the test process's own collector as it was


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


def test_settle_freezes_what_lives_and_collects_garbage_first():
    alive = [_Node() for _ in range(100)]
    garbage = _Node()
    garbage_id = id(garbage)
    del garbage
    frozen = heap.settle()
    assert frozen == gc.get_freeze_count() > 1000  # the interpreter's and the test's objects, not only ours
    assert not any(id(o) == garbage_id for o in gc.get_objects())  # collected before the freeze, not frozen
    assert all(not any(o is a for o in gc.get_objects()) for a in alive[:3])  # frozen: outside the generations
    later = _Node()
    assert any(o is later for o in gc.get_objects(generation=0))  # what serving allocates stays collectable


def test_run_settled_freezes_once_the_service_is_ready_and_passes_its_arguments():
    seen: dict[str, object] = {}

    async def serve(cfg: str, ready: asyncio.Event) -> None:
        seen["cfg"] = cfg
        await asyncio.sleep(0.01)
        seen["before_ready"] = gc.get_freeze_count()
        ready.set()
        for _ in range(10):  # the settling task runs once this one yields
            await asyncio.sleep(0)
        seen["after_ready"] = gc.get_freeze_count()

    heap.run_settled(serve, "cfg-1")
    assert seen == {"cfg": "cfg-1", "before_ready": 0, "after_ready": seen["after_ready"]}
    assert seen["after_ready"] > 0


def test_run_settled_never_freezes_a_service_that_fails_before_ready():
    async def serve(cfg: str, ready: asyncio.Event) -> None:
        raise OSError("port taken")

    with pytest.raises(OSError, match="port taken"):
        heap.run_settled(serve, "cfg")
    assert gc.get_freeze_count() == 0
