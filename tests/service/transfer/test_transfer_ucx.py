"""The UCX plane's own behaviour: a bounded close, its environment defaults, and the error when ucxx is missing
(what it shares with the tcp plane is in test_connection_planes.py). Runs over TCP/shared memory on loopback."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest

from moemesh.transfer.base import FirstToken, PlaneUnavailable
from moemesh.transfer.registry import make_receiver, make_sender
from tests.service.transfer.test_transfer_planes import move, plane_pair, random_rows

try:
    from moemesh.transfer.ucx import load_ucxx

    load_ucxx()
except PlaneUnavailable as e:  # only where ucxx truly cannot import; it can wherever moemesh[ucx] is installed
    pytest.skip(f"ucxx unavailable: {e}", allow_module_level=True)


def test_missing_ucxx_names_the_package_and_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ucxx", None)  # makes `import ucxx` raise ImportError
    for make in (make_receiver, make_sender):
        with pytest.raises(PlaneUnavailable, match=r"ucxx-cu12.*moemesh\[ucx\].*--transfer relay"):
            make("ucx")


def test_close_is_bounded_when_a_chunk_is_stuck() -> None:
    # A pair that never finishes (a receiver that stopped reading) holds the endpoint's lock; closing
    # must still end within its goodbye bound rather than wait for the lock forever.
    async def main():
        async with plane_pair("ucx") as (sender, receiver):
            await move(sender, receiver, "r", random_rows((2, 30, 64), seed=4), FirstToken(1))
            await sender._peers[receiver.address].lock.acquire()
            sender.bye_timeout_s = 0.5
            t0 = time.monotonic()
            await sender.close()
            return time.monotonic() - t0

    assert asyncio.run(main()) < 3.0


def test_ucx_environment_defaults_only_fill_gaps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UCX_TLS", "rc,sm,self")
    monkeypatch.delenv("UCX_WARN_UNUSED_ENV_VARS", raising=False)
    load_ucxx()
    assert sys.modules["ucxx"] is not None
    assert (os.environ["UCX_TLS"], os.environ["UCX_WARN_UNUSED_ENV_VARS"]) == ("rc,sm,self", "n")
