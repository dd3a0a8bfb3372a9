"""The wire contract version this build speaks, and the check every handshake runs."""

from __future__ import annotations

from moemesh.service.errors import FailedPrecondition
from moemesh.v1 import common_pb2

PROTOCOL_VERSION = common_pb2.PROTOCOL_VERSION_V1


def check_protocol_version(version: int, peer: str) -> None:
    """Refuse a peer that speaks another contract version, naming both."""
    if version != PROTOCOL_VERSION:
        name = common_pb2.ProtocolVersion.Name(version) if version in common_pb2.ProtocolVersion.values() \
            else str(version)
        raise FailedPrecondition(
            f"{peer} speaks protocol {name}, this service speaks "
            f"{common_pb2.ProtocolVersion.Name(PROTOCOL_VERSION)}")
