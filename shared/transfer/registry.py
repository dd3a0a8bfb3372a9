"""The one place that maps plane names to backends. A backend's module is imported only when its plane
is asked for, so a host without `ucxx` runs the relay and in-process planes untouched.

    make_receiver("ucx", host="10.0.0.5", port=0)
    make_receiver("relay", target="kvtransfer:50060")
    make_sender("inproc")
"""

from __future__ import annotations

import importlib
from typing import Any

from moemesh.transfer import faults
from moemesh.transfer.base import KvReceiver, KvSender
from moemesh.v1 import kvtransfer_pb2

# Parsed here, at a worker's start-up (its serve imports this module first): a malformed
# MOEMESH_FAULT_KV fails the start, not the first transfer (senders are made on first use).
faults.configured()

# plane -> (module, receiver class, sender class)
_BACKENDS: dict[str, tuple[str, str, str]] = {
    "ucx": ("moemesh.transfer.ucx", "UcxReceiver", "UcxSender"),
    "relay": ("moemesh.transfer.relay", "RelayReceiver", "RelaySender"),
    "inproc": ("moemesh.transfer.inproc", "InprocReceiver", "InprocSender"),
}
PLANES: tuple[str, ...] = tuple(_BACKENDS)

_PROTO: dict[str, int] = {
    "ucx": kvtransfer_pb2.DATA_PLANE_UCX,
    "relay": kvtransfer_pb2.DATA_PLANE_RELAY,
    "inproc": kvtransfer_pb2.DATA_PLANE_INPROC,
}


def _backend(plane: str) -> tuple[str, str, str]:
    try:
        return _BACKENDS[plane]
    except KeyError:
        raise ValueError(f"unknown KV data plane {plane!r}; choose one of {', '.join(PLANES)}") from None


def make_receiver(plane: str, **kw: Any) -> KvReceiver:
    """A receiver of `plane` built with `kw` (ucx: host, port; relay: target; all: RoomTable limits).

    Raises ValueError for an unknown plane, PlaneUnavailable when its package is missing.
    """
    module, receiver, _ = _backend(plane)
    return getattr(importlib.import_module(module), receiver)(**kw)


def make_sender(plane: str, **kw: Any) -> KvSender:
    """A sender of `plane` built with `kw` (all: max_chunk_bytes; relay: target; ucx: connect/send timeouts).

    Raises ValueError for an unknown plane, PlaneUnavailable when its package is missing.
    """
    module, _, sender = _backend(plane)
    return getattr(importlib.import_module(module), sender)(**kw)


def plane_to_proto(plane: str) -> int:
    """The `DataPlane` enum value a receiver registers at kvtransfer for `plane`."""
    _backend(plane)
    return _PROTO[plane]


def plane_from_proto(value: int) -> str:
    """The plane name of a `DataPlane` enum value (what ResolveReceiver returned); ValueError when unset."""
    for plane, proto in _PROTO.items():
        if proto == value:
            return plane
    raise ValueError(f"no KV data plane for DataPlane enum value {value}")
