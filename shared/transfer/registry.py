"""Builds a plane's receiver and sender by name. The planes are registered in `planes.py`; a backend's module
is imported only when its plane is asked for, so a host without `ucxx` runs the relay and in-process planes
untouched.

    make_receiver("ucx", host="10.0.0.5", port=0)
    make_receiver("relay", target="kvtransfer:50060")
    make_sender("inproc")
"""

from __future__ import annotations

from typing import Any

from moemesh.transfer import faults
from moemesh.transfer.base import KvReceiver, KvSender
from moemesh.transfer.planes import PLANES

# Parsed here, at a worker's start-up (its serve imports this module first): a malformed
# MOEMESH_FAULT_KV fails the start, not the first transfer (senders are made on first use).
faults.configured()


def make_receiver(plane: str, **kw: Any) -> KvReceiver:
    """A receiver of `plane` built with `kw` (ucx: host, port; relay: target; all: IncomingTransfers limits).

    Raises ValueError for an unknown plane, PlaneUnavailable when its package is missing.
    """
    return PLANES.load(plane, PLANES.entry(plane).info["receiver"])(**kw)


def make_sender(plane: str, **kw: Any) -> KvSender:
    """A sender of `plane` built with `kw` (all: max_chunk_bytes; relay: target; ucx: connect/send timeouts).

    Raises ValueError for an unknown plane, PlaneUnavailable when its package is missing.
    """
    return PLANES.load(plane, PLANES.entry(plane).info["sender"])(**kw)
