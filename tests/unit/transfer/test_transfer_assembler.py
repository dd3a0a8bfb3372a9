"""The shared receive side: chunk sequence checks, early buffering, coverage, limits, cancel and close."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest
import torch

from moemesh.transfer.assembler import IncomingTransfers
from moemesh.transfer.base import FirstToken, RowBlock, TransferError
from moemesh.transfer.chunk import DecodedChunk, decode_chunk, encode_last, encode_rows

L, W = 2, 8


def _chunks(room: str, sizes: Sequence[int], first: int = 5) -> list[DecodedChunk]:
    """Decoded chunks of `room` covering sum(sizes) tokens in blocks of `sizes`, then the closing chunk."""
    out, start = [], 0
    for i, n in enumerate(sizes):
        rows = torch.full((L, n, W), float(i))
        out.append(decode_chunk(encode_rows(room, i, RowBlock(start, rows)).to_message()))
        start += n
    out.append(decode_chunk(encode_last(room, len(sizes), start, FirstToken(first)).to_message()))
    return out


def _run(incoming: IncomingTransfers, room: str, num_tokens: int, feed: Callable[[], None],
         timeout_s: float = 2.0) -> tuple[FirstToken, int, list[tuple[int, int]]]:
    """Receive `room` while `feed` delivers; returns (first, bytes, [(token_start, tokens) written])."""
    writes: list[tuple[int, int]] = []

    async def main():
        task = asyncio.ensure_future(incoming.receive(room, num_tokens, lambda s, r: writes.append((s, r.shape[1])),
                                                   timeout_s))
        await asyncio.sleep(0)
        feed()
        first, nbytes = await task
        return first, nbytes, writes

    return asyncio.run(main())


def test_in_order_chunks_are_written_and_first_token_returned() -> None:
    incoming = IncomingTransfers()
    chunks = _chunks("a", [3, 3, 2], first=11)
    first, nbytes, writes = _run(incoming, "a", 8, lambda: [incoming.deliver(c) for c in chunks])
    assert first == FirstToken(11)
    assert nbytes == 8 * L * W * 4
    assert writes == [(0, 3), (3, 3), (6, 2)]
    assert len(incoming) == 0


def test_chunks_before_receive_are_buffered() -> None:
    async def main():
        incoming = IncomingTransfers()
        for c in _chunks("a", [4, 4]):
            incoming.deliver(c)
        got: list[int] = []
        first, _ = await incoming.receive("a", 8, lambda s, r: got.append(s), 1.0)
        return first, got

    assert asyncio.run(main()) == (FirstToken(5), [0, 4])


@pytest.mark.parametrize(("edit", "match"), [
    (lambda cs: [cs[0], cs[2], cs[3]], "gap: got chunk 2, expected 1"),
    (lambda cs: [cs[0], cs[0], cs[1], cs[2], cs[3]], "duplicate: got chunk 0, expected 1"),
    (lambda cs: [cs[1], cs[0], cs[2], cs[3]], "gap: got chunk 1, expected 0"),
])
def test_gaps_and_duplicates_fail_the_room(edit, match: str) -> None:
    incoming = IncomingTransfers()
    chunks = edit(_chunks("a", [3, 3, 2]))
    with pytest.raises(TransferError, match=match):
        _run(incoming, "a", 8, lambda: [incoming.deliver(c) for c in chunks])


def test_token_overlap_fails() -> None:
    incoming = IncomingTransfers()
    a = _chunks("a", [3])[0]
    b = decode_chunk(encode_rows("a", 1, RowBlock(2, torch.zeros(L, 2, W))).to_message())
    with pytest.raises(TransferError, match="starts at token 2, expected 3"):
        _run(incoming, "a", 5, lambda: [incoming.deliver(a), incoming.deliver(b)])


def test_layout_change_fails() -> None:
    incoming = IncomingTransfers()
    a = _chunks("a", [3])[0]
    b = decode_chunk(encode_rows("a", 1, RowBlock(3, torch.zeros(L + 1, 2, W))).to_message())
    with pytest.raises(TransferError, match="layout"):
        _run(incoming, "a", 5, lambda: [incoming.deliver(a), incoming.deliver(b)])


def test_missing_last_chunk_times_out() -> None:
    incoming = IncomingTransfers()
    chunks = _chunks("a", [3, 3])[:-1]
    with pytest.raises(TransferError, match=r"timed out after 0.2 s \(2 chunks arrived, 6 tokens written"):
        _run(incoming, "a", 6, lambda: [incoming.deliver(c) for c in chunks], timeout_s=0.2)


def test_num_chunks_mismatch_fails() -> None:
    incoming = IncomingTransfers()
    chunks = _chunks("a", [3, 3])
    chunks[-1] = DecodedChunk(**{**chunks[-1].__dict__, "num_chunks": 5})
    with pytest.raises(TransferError, match="last chunk says 5 chunks, but 3 arrived"):
        _run(incoming, "a", 6, lambda: [incoming.deliver(c) for c in chunks])


@pytest.mark.parametrize(("num_tokens", "match"), [(5, "rows up to token 6"), (8, "after token 6, but the room has 8")])
def test_token_coverage_must_match(num_tokens: int, match: str) -> None:
    incoming = IncomingTransfers()
    chunks = _chunks("a", [3, 3])
    with pytest.raises(TransferError, match=match):
        _run(incoming, "a", num_tokens, lambda: [incoming.deliver(c) for c in chunks])


def test_failure_after_last_chunk_is_ignored() -> None:
    incoming = IncomingTransfers()
    chunks = _chunks("a", [2])

    def feed() -> None:
        for c in chunks:
            incoming.deliver(c)
        incoming.fail("a", TransferError("connection lost"))  # every byte already here: keep the room

    assert _run(incoming, "a", 2, feed)[0] == FirstToken(5)


def test_room_buffer_limit() -> None:
    incoming = IncomingTransfers(max_room_buffer_bytes=3 * L * W * 4)
    chunks = _chunks("a", [2, 2])
    with pytest.raises(TransferError, match="bytes buffered"):
        asyncio.run(_deliver_then_receive(incoming, chunks, "a", 4))


async def _deliver_then_receive(incoming: IncomingTransfers, chunks: list[DecodedChunk], room: str, n: int):
    for c in chunks:
        incoming.deliver(c)
    return await incoming.receive(room, n, lambda s, r: None, 1.0)


def test_unclaimed_room_limits() -> None:
    incoming = IncomingTransfers(max_unclaimed_rooms=1, unclaimed_ttl_s=60)
    a, b = _chunks("a", [1]), _chunks("b", [1])
    with pytest.raises(TransferError, match="dropped: more than 1 rooms"):
        asyncio.run(_deliver_then_receive(incoming, a + b, "b", 1))
    assert asyncio.run(_deliver_then_receive(incoming, [], "a", 1))[0] == FirstToken(5)

    incoming = IncomingTransfers(unclaimed_ttl_s=0)
    incoming.deliver(a[0])
    incoming.deliver(b[0])  # "a" expired when "b" arrived
    with pytest.raises(TransferError, match="no receive within 0 s"):
        asyncio.run(_deliver_then_receive(incoming, [], "a", 1))


def test_cancel_fails_a_running_receive_and_drops_later_chunks() -> None:
    incoming = IncomingTransfers()

    async def main():
        task = asyncio.ensure_future(incoming.receive("a", 4, lambda s, r: None, 5.0))
        await asyncio.sleep(0.01)
        incoming.cancel("a")
        with pytest.raises(TransferError, match="cancelled"):
            await asyncio.wait_for(task, 1.0)
        for c in _chunks("a", [4]):
            incoming.deliver(c)  # late chunks of a cancelled room are dropped
        assert len(incoming) == 0
        with pytest.raises(TransferError, match="already ended"):
            await incoming.receive("a", 4, lambda s, r: None, 1.0)
        incoming.cancel("b")  # before any chunk or receive
        for c in _chunks("b", [4]):
            incoming.deliver(c)
        assert len(incoming) == 0

    asyncio.run(main())


def test_second_receive_of_a_room_is_refused() -> None:
    incoming = IncomingTransfers()

    async def main():
        task = asyncio.ensure_future(incoming.receive("a", 1, lambda s, r: None, 5.0))
        await asyncio.sleep(0)
        with pytest.raises(TransferError, match="already being received"):
            await incoming.receive("a", 1, lambda s, r: None, 1.0)
        incoming.cancel("a")
        with pytest.raises(TransferError):
            await task

    asyncio.run(main())


def test_close_fails_pending_receives() -> None:
    incoming = IncomingTransfers()

    async def main():
        task = asyncio.ensure_future(incoming.receive("a", 1, lambda s, r: None, 5.0))
        incoming.deliver(_chunks("b", [1])[0])
        await asyncio.sleep(0)
        incoming.close()
        with pytest.raises(TransferError, match="closed"):
            await asyncio.wait_for(task, 1.0)
        with pytest.raises(TransferError, match="closed"):
            await incoming.receive("b", 1, lambda s, r: None, 1.0)
        assert len(incoming) == 0

    asyncio.run(main())
