"""The KV data planes by name: one registration line each, and their names on the wire. Imports no torch and
no backend, so parsers take their `--transfer` choices from here.

A plane's module holds its receiver and sender classes; `moemesh.transfer.registry` builds them. On the wire
(kvtransfer's RegisterReceiver / ResolveReceiver) a plane travels as its registered name (`data_plane_name`)
and, for the planes the `DataPlane` enum lists (value DATA_PLANE_<NAME>), as that value too, which is what
peers built before the name existed read. A new plane needs no enum value: it travels by name alone.
"""

from __future__ import annotations

from moemesh.registry import Registry
from moemesh.v1 import kvtransfer_pb2

PLANES = Registry("KV data plane")
# name, module, its receiver and sender classes; cross_process: it can join two processes (inproc cannot).
PLANES.register("ucx", "moemesh.transfer.ucx", receiver="UcxReceiver", sender="UcxSender", cross_process=True)
PLANES.register("relay", "moemesh.transfer.relay", receiver="RelayReceiver", sender="RelaySender",
                cross_process=True)
PLANES.register("inproc", "moemesh.transfer.inproc", receiver="InprocReceiver", sender="InprocSender",
                cross_process=False)
PLANES.register("tcp", "moemesh.transfer.tcp", receiver="TcpReceiver", sender="TcpSender", cross_process=True)

_ENUM_PREFIX = "DATA_PLANE_"


def plane_to_proto(plane: str) -> int:
    """The `DataPlane` value sent next to `plane`'s name: DATA_PLANE_<PLANE>, or DATA_PLANE_UNSPECIFIED for a
    plane the enum does not list. ValueError for a plane that is not registered."""
    PLANES.entry(plane)
    key = _ENUM_PREFIX + plane.upper()
    if key not in kvtransfer_pb2.DataPlane.keys():
        return kvtransfer_pb2.DATA_PLANE_UNSPECIFIED
    return kvtransfer_pb2.DataPlane.Value(key)


def plane_from_proto(value: int, name: str = "") -> str:
    """The plane a peer named: `name` (data_plane_name) when set, else the plane of the enum `value` (what
    peers that predate the name send).

    ValueError when neither names a registered plane, or when both are set and disagree.
    """
    if name:
        PLANES.entry(name)
        if value and value != plane_to_proto(name):
            raise ValueError(f"data_plane {_enum_name(value)} and data_plane_name {name!r} name different planes")
        return name
    enum_name = _enum_name(value)
    plane = enum_name.removeprefix(_ENUM_PREFIX).lower()
    if not value or not enum_name.startswith(_ENUM_PREFIX) or plane not in PLANES:
        raise ValueError(f"no KV data plane for DataPlane value {enum_name}")
    return plane


def _enum_name(value: int) -> str:
    return kvtransfer_pb2.DataPlane.Name(value) if value in kvtransfer_pb2.DataPlane.values() else str(value)
