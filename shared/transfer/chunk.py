"""KV rows <-> `KvChunk` messages, and splitting rows into chunks. Legend: L layers, N tokens, W row width.

A chunk's `data` is the rows [L, N, W] as raw little-endian bytes, layer-major (the C order of the
[L, N, W] tensor), with a zlib CRC-32 beside them. No pickle: the header is protobuf, the rows are bytes.
The encoders return the header and the bytes apart (`EncodedChunk`) so that a plane which can move a
buffer on its own (UCX) never copies the rows into a protobuf message.
"""

from __future__ import annotations

import inspect
import sys
import zlib
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from moemesh.transfer.base import FirstToken, RowBlock, TransferError
from moemesh.v1 import common_pb2, kvtransfer_pb2

# Chunks a sender cuts rows into by default: big enough to amortise per-message costs, small enough
# that gRPC, the receiver's buffers and a retry stay cheap.
DEFAULT_CHUNK_BYTES = 4 * 2**20

_TO_PROTO: dict[torch.dtype, int] = {
    torch.float32: common_pb2.KV_DTYPE_FLOAT32,
    torch.bfloat16: common_pb2.KV_DTYPE_BFLOAT16,
    torch.float16: common_pb2.KV_DTYPE_FLOAT16,
}
_FROM_PROTO: dict[int, torch.dtype] = {v: k for k, v in _TO_PROTO.items()}
# numpy has no bfloat16: its bytes travel as int16 of the same width.
_NUMPY_CARRIER: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.int16}


def dtype_to_proto(dtype: torch.dtype) -> int:
    """The `KvDtype` enum value of a row dtype (float32, bfloat16 or float16)."""
    try:
        return _TO_PROTO[dtype]
    except KeyError:
        raise ValueError(f"KV rows must be float32, bfloat16 or float16, not {dtype}") from None


def dtype_from_proto(value: int) -> torch.dtype:
    """The torch dtype of a `KvDtype` enum value; TransferError for an unknown one."""
    try:
        return _FROM_PROTO[value]
    except KeyError:
        raise TransferError(f"unknown KV dtype enum value {value}") from None


def _require_little_endian() -> None:
    # The wire format is little-endian and every host we run on is; fail loudly rather than swap bytes.
    if sys.byteorder != "little":
        raise TransferError("KV data planes need a little-endian host")


@dataclass(frozen=True)
class EncodedChunk:
    """A chunk ready to send: `header` is a KvChunk with every field but `data` (checksum included);
    `data` is its rows' bytes, uint8 [L*N*W*itemsize], C-contiguous (empty for a row-less chunk)."""

    header: kvtransfer_pb2.KvChunk
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def to_message(self) -> kvtransfer_pb2.KvChunk:
        """The whole KvChunk, `data` included (one copy of the bytes, for planes that carry protobuf)."""
        msg = kvtransfer_pb2.KvChunk()
        msg.CopyFrom(self.header)
        msg.data = self.data.tobytes()
        return msg


@dataclass(frozen=True)
class DecodedChunk:
    """A verified chunk. `rows` [L, N, W] of the chunk's dtype (a fresh CPU tensor the writer may keep),
    None when the chunk carries no rows (N == 0). `first` and `num_chunks` are set on the last chunk only."""

    room_id: str
    chunk_index: int
    token_start: int
    num_tokens: int
    rows: torch.Tensor | None
    nbytes: int
    last: bool
    first: FirstToken | None
    num_chunks: int

    @property
    def token_end(self) -> int:
        return self.token_start + self.num_tokens


def _rows_to_bytes(rows: torch.Tensor) -> np.ndarray:
    """rows [L, N, W] (any device, any strides) -> uint8 [L*N*W*itemsize], C order (layer-major)."""
    rows = rows.detach().contiguous().cpu()
    carrier = _NUMPY_CARRIER.get(rows.dtype)
    if carrier is not None:
        rows = rows.view(carrier)
    return rows.numpy().reshape(-1).view(np.uint8)


def encode_rows(room_id: str, chunk_index: int, block: RowBlock) -> EncodedChunk:
    """One chunk of `block.rows` [L, N, W] (float32/bfloat16/float16), tokens [token_start, token_start + N)."""
    _require_little_endian()
    rows = block.rows
    if rows.dim() != 3:
        raise ValueError(f"KV rows must be [L, N, W], got shape {tuple(rows.shape)}")
    dtype = dtype_to_proto(rows.dtype)
    data = _rows_to_bytes(rows)
    header = kvtransfer_pb2.KvChunk(
        room_id=room_id, chunk_index=chunk_index, token_start=block.token_start,
        num_tokens=rows.shape[1], num_layers=rows.shape[0], row_width=rows.shape[2], dtype=dtype,
        checksum_crc32=zlib.crc32(data),
    )
    return EncodedChunk(header, data)


def encode_last(room_id: str, chunk_index: int, token_start: int, first: FirstToken) -> EncodedChunk:
    """The room's closing chunk: no rows, the first token, and `num_chunks` = chunk_index + 1."""
    header = kvtransfer_pb2.KvChunk(
        room_id=room_id, chunk_index=chunk_index, token_start=token_start, num_tokens=0,
        checksum_crc32=zlib.crc32(b""), last=True, first_token_id=first.token_id, num_chunks=chunk_index + 1,
    )
    if first.logprob is not None or first.top_logprobs is not None:
        header.first_logprobs.logprob = first.logprob if first.logprob is not None else 0.0
        for token_id, logprob in first.top_logprobs or ():
            header.first_logprobs.top.add(token_id=token_id, logprob=logprob)
    return EncodedChunk(header, np.empty(0, dtype=np.uint8))


def _first_token(msg: kvtransfer_pb2.KvChunk) -> FirstToken:
    if not msg.HasField("first_logprobs"):
        return FirstToken(msg.first_token_id)
    lp = msg.first_logprobs
    return FirstToken(msg.first_token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top))


def decode_chunk(msg: kvtransfer_pb2.KvChunk, data: np.ndarray | bytes | bytearray | None = None) -> DecodedChunk:
    """Verify and decode a chunk. `data` replaces `msg.data` when the bytes travelled apart from the
    header (uint8 buffer; a numpy array is wrapped without a copy, so the caller must not reuse it).

    Raises TransferError on a checksum mismatch, a data size that does not match
    num_layers x num_tokens x row_width x itemsize, or an unknown dtype.
    """
    _require_little_endian()
    raw = msg.data if data is None else data
    nbytes = len(raw) if not isinstance(raw, np.ndarray) else int(raw.nbytes)
    where = f"room {msg.room_id!r} chunk {msg.chunk_index}"
    if zlib.crc32(raw) != msg.checksum_crc32:
        raise TransferError(f"{where}: checksum mismatch (data corrupted in transit)")
    if msg.num_tokens == 0:
        if nbytes:
            raise TransferError(f"{where}: {nbytes} data bytes for zero tokens")
        rows = None
    else:
        dtype = dtype_from_proto(msg.dtype)
        shape = (msg.num_layers, msg.num_tokens, msg.row_width)
        expected = shape[0] * shape[1] * shape[2] * dtype.itemsize
        if nbytes != expected or expected == 0:
            raise TransferError(f"{where}: {nbytes} data bytes, but shape {shape} of {dtype} needs {expected}")
        if isinstance(raw, np.ndarray):
            flat = torch.from_numpy(raw.reshape(-1).view(np.uint8))
        else:
            # Protobuf bytes are immutable; the writer gets its own tensor, so copy once here.
            flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        rows = flat.view(dtype).view(shape)
    if msg.last and msg.num_chunks != msg.chunk_index + 1:
        raise TransferError(f"{where}: the last chunk says the room has {msg.num_chunks} chunks, "
                            f"but it is chunk number {msg.chunk_index + 1}")
    return DecodedChunk(
        room_id=msg.room_id, chunk_index=msg.chunk_index, token_start=msg.token_start,
        num_tokens=msg.num_tokens, rows=rows, nbytes=nbytes, last=msg.last,
        first=_first_token(msg) if msg.last else None, num_chunks=msg.num_chunks if msg.last else 0,
    )


def tokens_per_chunk(num_layers: int, row_width: int, dtype: torch.dtype, max_chunk_bytes: int) -> int:
    """The most tokens whose rows [num_layers, n, row_width] fit in max_chunk_bytes (at least 1)."""
    per_token = num_layers * row_width * dtype.itemsize
    return max(1, max_chunk_bytes // max(1, per_token))


def split_block(block: RowBlock, max_tokens: int) -> Iterator[RowBlock]:
    """Cut rows [L, N, W] into consecutive blocks of at most max_tokens tokens (views, no copy)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    n = block.rows.shape[1]
    for start in range(0, n, max_tokens):
        yield RowBlock(block.token_start + start, block.rows[:, start:start + max_tokens])


def discard(first: Awaitable[FirstToken]) -> None:
    """Drop a first-token awaitable a send will never await: a coroutine handed to a sender has no other
    owner, so close it (sparing the caller a "never awaited" warning); a future is left to its owner."""
    if inspect.iscoroutine(first):
        first.close()


async def iter_chunks(room_id: str, blocks: AsyncIterator[RowBlock], first: Awaitable[FirstToken],
                      max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> AsyncIterator[EncodedChunk]:
    """A room's chunks, as every sender emits them: `blocks` cut into chunks of at most max_chunk_bytes
    (at least one token each), encoded as they come, then a closing row-less chunk with the first token.

    Raises ValueError when the blocks are not consecutive from token 0 or change layout (a caller bug).
    """
    index = 0
    next_token = 0
    layout: tuple[int, int, torch.dtype] | None = None
    try:
        async for block in blocks:
            rows = block.rows
            if rows.dim() != 3:
                raise ValueError(f"KV rows must be [L, N, W], got shape {tuple(rows.shape)}")
            if block.token_start != next_token:
                raise ValueError(f"room {room_id!r}: block starts at token {block.token_start}, expected {next_token}")
            this = (rows.shape[0], rows.shape[2], rows.dtype)
            if layout is not None and this != layout:
                raise ValueError(f"room {room_id!r}: block layout (L, W, dtype) {this} differs from {layout}")
            layout = this
            max_tokens = tokens_per_chunk(this[0], this[1], this[2], max_chunk_bytes)
            for piece in split_block(block, max_tokens):
                yield encode_rows(room_id, index, piece)
                index += 1
            next_token += rows.shape[1]
    except BaseException:
        discard(first)
        raise
    yield encode_last(room_id, index, next_token, await first)
