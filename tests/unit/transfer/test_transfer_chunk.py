"""KV chunk encoding: bit-exact roundtrips, checksum and shape checks, chunking of rows. L layers, N tokens, W width."""

from __future__ import annotations

import asyncio
import zlib

import numpy as np
import pytest
import torch

from moemesh.transfer.base import FirstToken, RowBlock, TransferError
from moemesh.transfer.chunk import (
    decode_chunk,
    dtype_from_proto,
    encode_last,
    encode_rows,
    iter_chunks,
    split_block,
    tokens_per_chunk,
)
from moemesh.v1 import common_pb2, kvtransfer_pb2

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rows(shape: tuple[int, int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so comparisons are exact (NaN, -0.0 included)."""
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_is_bit_exact(dtype: torch.dtype) -> None:
    rows = _rows((3, 17, 40), dtype)
    rows[0, 0, 0] = float("nan")
    rows[1, 2, 3] = -0.0
    enc = encode_rows("room", 5, RowBlock(token_start=11, rows=rows))
    msg = kvtransfer_pb2.KvChunk.FromString(enc.to_message().SerializeToString())
    assert (msg.num_layers, msg.num_tokens, msg.row_width, msg.token_start) == (3, 17, 40, 11)
    assert dtype_from_proto(msg.dtype) == dtype
    assert len(msg.data) == rows.numel() * rows.element_size()
    assert msg.checksum_crc32 == zlib.crc32(msg.data)
    dec = decode_chunk(msg)
    assert dec.rows is not None and dec.rows.dtype == dtype and dec.rows.shape == (3, 17, 40)
    assert torch.equal(_bits(dec.rows), _bits(rows))
    assert (dec.room_id, dec.chunk_index, dec.token_start, dec.num_tokens, dec.last) == ("room", 5, 11, 17, False)
    # The same bytes, carried apart from the header (the UCX path).
    dec2 = decode_chunk(enc.header, enc.data.copy())
    assert torch.equal(_bits(dec2.rows), _bits(rows))


def test_layout_is_layer_major_little_endian() -> None:
    rows = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    enc = encode_rows("r", 0, RowBlock(0, rows[:, 1:]))  # a strided view is made contiguous
    assert np.frombuffer(enc.data.tobytes(), dtype="<f4").tolist() == [2, 3, 4, 5, 8, 9, 10, 11]


def test_corrupted_data_fails_checksum() -> None:
    msg = encode_rows("room", 0, RowBlock(0, _rows((2, 4, 8), torch.float32))).to_message()
    data = bytearray(msg.data)
    data[7] ^= 0x10
    msg.data = bytes(data)
    with pytest.raises(TransferError, match="checksum"):
        decode_chunk(msg)


@pytest.mark.parametrize("change", ["short", "long", "shape"])
def test_size_and_shape_inconsistency(change: str) -> None:
    msg = encode_rows("room", 0, RowBlock(0, _rows((2, 4, 8), torch.bfloat16))).to_message()
    if change == "short":
        msg.data = msg.data[:-2]
    elif change == "long":
        msg.data = msg.data + b"\0\0"
    else:
        msg.num_tokens = 5
    msg.checksum_crc32 = zlib.crc32(msg.data)
    with pytest.raises(TransferError, match="data bytes"):
        decode_chunk(msg)


def test_unknown_dtype_and_bad_input() -> None:
    msg = encode_rows("room", 0, RowBlock(0, _rows((1, 2, 4), torch.float32))).to_message()
    msg.dtype = common_pb2.KV_DTYPE_UNSPECIFIED
    with pytest.raises(TransferError, match="dtype"):
        decode_chunk(msg)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        encode_rows("room", 0, RowBlock(0, torch.zeros(1, 2, 4, dtype=torch.int32)))
    with pytest.raises(ValueError, match=r"\[L, N, W\]"):
        encode_rows("room", 0, RowBlock(0, torch.zeros(2, 4)))


def test_last_chunk_carries_first_token() -> None:
    first = FirstToken(42, -0.25, ((42, -0.25), (7, -2.5)))
    msg = encode_last("room", 3, 300, first).to_message()
    dec = decode_chunk(kvtransfer_pb2.KvChunk.FromString(msg.SerializeToString()))
    assert dec.last and dec.rows is None and dec.num_chunks == 4 and dec.token_start == 300
    assert dec.first == first
    plain = decode_chunk(encode_last("room", 0, 5, FirstToken(9)).to_message())
    assert plain.first == FirstToken(9)
    msg.num_chunks = 3
    with pytest.raises(TransferError, match="has 3 chunks"):
        decode_chunk(msg)


def test_split_and_tokens_per_chunk() -> None:
    # 4 MB chunks of DeepSeek-V3 rows (61 layers x 576 bf16): 59 tokens each.
    assert tokens_per_chunk(61, 576, torch.bfloat16, 4 * 2**20) == 59
    assert tokens_per_chunk(61, 576, torch.float32, 10) == 1
    rows = _rows((2, 10, 3), torch.float32)
    parts = list(split_block(RowBlock(100, rows), 4))
    assert [(p.token_start, p.rows.shape[1]) for p in parts] == [(100, 4), (104, 4), (108, 2)]
    assert torch.equal(torch.cat([p.rows for p in parts], dim=1), rows)


def test_iter_chunks_cuts_blocks_and_closes_with_first_token() -> None:
    rows = _rows((4, 300, 576), torch.float32)

    async def blocks():
        for s in range(0, 300, 128):
            yield RowBlock(s, rows[:, s:s + 128])

    async def first() -> FirstToken:
        return FirstToken(3)

    async def collect():
        return [c async for c in iter_chunks("r", blocks(), first(), max_chunk_bytes=256 * 2**10)]

    chunks = asyncio.run(collect())
    per = tokens_per_chunk(4, 576, torch.float32, 256 * 2**10)  # 28
    assert [c.header.chunk_index for c in chunks] == list(range(len(chunks)))
    assert all(c.header.num_tokens <= per for c in chunks)
    assert sum(c.header.num_tokens for c in chunks) == 300
    assert chunks[-1].header.last and chunks[-1].header.num_chunks == len(chunks)
    got = torch.cat([decode_chunk(c.header, c.data).rows for c in chunks[:-1]], dim=1)
    assert torch.equal(got, rows)


def test_iter_chunks_rejects_gaps() -> None:
    async def blocks():
        yield RowBlock(0, torch.zeros(1, 2, 4))
        yield RowBlock(3, torch.zeros(1, 2, 4))

    async def first() -> FirstToken:
        return FirstToken(1)

    async def collect():
        return [c async for c in iter_chunks("r", blocks(), first())]

    with pytest.raises(ValueError, match="starts at token 3, expected 2"):
        asyncio.run(collect())
