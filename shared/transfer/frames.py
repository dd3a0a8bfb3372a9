"""The frame every byte-stream KV plane (ucx, tcp) puts before a chunk's rows.

Per chunk: `<4sHHIQ` = magic b"MMKV", version 1, flags, header length H, data length D; then H bytes, the
serialized KvChunk with `data` empty (checksum and shape included); then the D raw row bytes (chunk.py), sent
straight from the rows' buffer. A frame with flags set and H = D = 0 is a control frame of the plane's own.
"""

from __future__ import annotations

import struct

from moemesh.transfer.base import TransferError
from moemesh.transfer.chunk import EncodedChunk
from moemesh.v1 import kvtransfer_pb2

FRAME = struct.Struct("<4sHHIQ")
MAGIC = b"MMKV"
VERSION = 1
# A frame and its header fit in this much, so a receiver can read them into one fixed buffer.
MAX_FRAME_BYTES = 64 * 2**10
# A receiver refuses to allocate more than this for one chunk (a corrupt frame, not a real chunk).
MAX_CHUNK_BYTES = 2**30


class CorruptFrame(Exception):
    """What arrived is not a moemesh KV frame (wrong magic or version, impossible lengths, bad header)."""


def parse_address(address: str, plane: str) -> tuple[str, int]:
    """"host:port" (IPv6 hosts in brackets) -> (host, port); TransferError naming `plane` when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise TransferError(f"bad {plane} address {address!r}: expected host:port")
    return host.strip("[]"), int(port)


def chunk_frame(chunk: EncodedChunk) -> bytearray:
    """The frame and header of `chunk` (its rows follow on the wire)."""
    header = chunk.header.SerializeToString()
    if FRAME.size + len(header) > MAX_FRAME_BYTES:
        raise TransferError(f"room {chunk.header.room_id!r}: chunk header of {len(header)} bytes is too large")
    frame = bytearray(FRAME.size + len(header))
    FRAME.pack_into(frame, 0, MAGIC, VERSION, 0, len(header), chunk.nbytes)
    frame[FRAME.size:] = header
    return frame


def control_frame(flags: int) -> bytearray:
    """A frame with no header and no data, only `flags`."""
    frame = bytearray(FRAME.size)
    FRAME.pack_into(frame, 0, MAGIC, VERSION, flags, 0, 0)
    return frame


def frame_lengths(frame: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """(flags, header length, data length) of a frame, after checking magic, version and bounds."""
    magic, version, flags, header_len, data_len = FRAME.unpack_from(frame)
    if magic != MAGIC or version != VERSION:
        raise CorruptFrame(f"not a moemesh KV frame (magic {magic!r}, version {version})")
    if header_len > MAX_FRAME_BYTES - FRAME.size or data_len > MAX_CHUNK_BYTES:
        raise CorruptFrame(f"frame announces a {header_len}-byte header and {data_len} data bytes")
    return flags, header_len, data_len


def parse_header(raw: bytes | bytearray | memoryview) -> kvtransfer_pb2.KvChunk:
    """The KvChunk header that followed a frame; CorruptFrame when it does not parse."""
    try:
        return kvtransfer_pb2.KvChunk.FromString(bytes(raw))
    except Exception as e:  # protobuf's DecodeError
        raise CorruptFrame(f"bad chunk header: {e}") from e
