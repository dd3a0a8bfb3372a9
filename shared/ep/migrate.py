"""Staging one round of a placement switch: the new experts of this rank's changed slots, copied into a buffer of
their own while the layer keeps serving its current weights. A collective over the switch's own process group.

Where the staging bound holds the rank's whole layer, the round is staged into a copy of the layer (its unchanged
slots copied, its changed ones written there), which then replaces the layer at the step boundary by a pointer
swap; else only the changed slots' experts are staged, as rows copied into the layer at the boundary.

Every rank runs the same schedule, computed from the round alone: a changed slot copies its expert locally when
its rank holds it, else receives it from the source the plan chose. Each slot's expert travels as one row of
bytes (weights, and FP8 block scales where kept); the rows between two ranks form a byte stream, cut into pieces
so that one call moves at most `chunk_bytes` per rank, and every call waits for `turn()` first: that is how the
copies are paced against serving steps. A rank whose part fails (the fault hook, a bad allocation) keeps joining
the calls with zeros, so no peer waits on it, and the round ends in one agreement whether every rank staged it.

Legend: S local slots, M this rank's changed slots in the round, W bytes of one slot's expert.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moemesh.ep.move_plan import Round

log = logging.getLogger(__name__)


@dataclass
class Staged:
    """A round staged on this rank, in one of two forms: `layer` (the layer's slot tensors as they serve after the
    round, each [S, ...], with `form` the grouped GEMM's form of them once prepared), or `rows` [M, W] uint8, the
    new experts of local slots `slots` (slot order). Neither when this rank's slots do not change."""

    round: Round
    slots: list[int]
    rows: torch.Tensor | None
    ok: bool  # every rank staged its part (agreed)
    layer: list[torch.Tensor] | None = None
    form: Any = None
    form_bytes: int = 0  # what `form` holds beyond `layer` (a packed or quantized copy)

    @property
    def nbytes(self) -> int:
        if self.layer is not None:
            return sum(t.numel() * t.element_size() for t in self.layer) + self.form_bytes
        return self.rows.numel() if self.rows is not None else 0


def slot_rows(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """parts: a layer's slot tensors, each [S, ...] contiguous -> each as [S, W_part] uint8 views (no copy)."""
    return [t.reshape(t.shape[0], -1).view(torch.uint8) for t in parts]


def slot_width(parts: list[torch.Tensor]) -> int:
    """W: bytes of one slot's expert over all of `parts`."""
    return sum(t[0].numel() * t.element_size() for t in parts) if parts and parts[0].shape[0] else 0


class _Stream:
    """A run of byte rows read or written as one stream (rows: 1-D uint8 views, in stream order)."""

    def __init__(self, rows: list[torch.Tensor]) -> None:
        self.rows = rows
        self.size = sum(r.numel() for r in rows)

    def pieces(self, start: int, stop: int) -> list[tuple[torch.Tensor, int]]:
        """The parts of rows covering bytes [start, stop): (row slice, offset within [start, stop))."""
        out, base = [], 0
        for r in self.rows:
            lo, hi = max(start, base), min(stop, base + r.numel())
            if lo < hi:
                out.append((r[lo - base:hi - base], lo - start))
            base += r.numel()
            if base >= stop:
                break
        return out


def stage_round(rnd: Round, parts: list[torch.Tensor], rank: int, ep_size: int, group: dist.ProcessGroup | None,
                chunk_bytes: int, turn: Callable[[], None], fault: Callable[[Round], None] | None = None,
                whole_layer: bool = False, buffer: list[torch.Tensor] | None = None) -> Staged:
    """Stage this rank's share of `rnd`; a collective over `group` (every rank calls it for the same round).

    parts: the layer's slot tensors as `EPExperts.slot_tensors` lists them (each [S, ...]), read, never written.
    whole_layer: stage into a copy of the whole layer (`Staged.layer`, for `EPExperts.swap_layer`) rather than
        into rows of the changed slots only (`Staged.rows`, for `EPExperts.switch_slots`).
    buffer: tensors shaped as `parts` that nothing reads any more, to make that copy in (else it is allocated).
    Returns what was staged, to be switched in once every rank has its part.
    """
    per_rank = parts[0].shape[0]
    width = slot_width(parts)
    byte_rows = slot_rows(parts)
    mine = [m for m in rnd.moves if m.slot // per_rank == rank]
    rows: torch.Tensor | None = None
    layer: list[torch.Tensor] | None = None
    into: list[list[torch.Tensor]] | None = None  # each of `mine`'s destination, as byte views in stream order
    ok = True
    try:
        if fault is not None:
            fault(rnd)
        if whole_layer and mine:
            # The unchanged slots as they are; the changed ones written below.
            layer = [b.copy_(t) for b, t in zip(buffer, parts, strict=True)] if buffer is not None else \
                [t.clone() for t in parts]
            new_rows = slot_rows(layer)
            into = [[t[m.slot - rank * per_rank] for t in new_rows] for m in mine]
        else:
            rows = torch.empty(len(mine), width, dtype=torch.uint8, device=parts[0].device)
            into = [[r] for r in rows]
        for i, m in enumerate(mine):  # local copies: this rank already holds the expert
            if m.source // per_rank == rank:
                _copy_bytes(own_rows(byte_rows, m.source - rank * per_rank), into[i])
    except Exception:  # any local failure fails the round on every rank, never the serving
        log.exception("EP rank %d: staging MoE layer %d failed here", rank, rnd.layer)
        ok = False

    # Streams between this rank and each peer, rows in the receiver's slot order (both sides list them alike). A
    # rank whose part failed before it had somewhere to write receives into nothing (its sizes still count).
    send = [_Stream([r for m in rnd.moves if m.source // per_rank == rank and m.slot // per_rank == d
                     for r in own_rows(byte_rows, m.source - rank * per_rank)]) if d != rank else _Stream([])
            for d in range(ep_size)]
    recv_sizes_all = [width * sum(1 for m in mine if m.source // per_rank == s) if s != rank else 0
                      for s in range(ep_size)]
    recv = [_Stream([v for i, m in enumerate(mine) if m.source // per_rank == s for v in into[i]])
            if s != rank and into is not None else _Stream([]) for s in range(ep_size)]
    piece, calls = _schedule(rnd, per_rank, ep_size, width, chunk_bytes)
    scratch = parts[0].new_empty(0, dtype=torch.uint8)
    for c in range(calls):
        turn()
        lo, hi = c * piece, (c + 1) * piece
        send_sizes = [max(0, min(hi, s.size) - lo) for s in send]
        recv_sizes = [max(0, min(hi, n) - lo) for n in recv_sizes_all]
        out = scratch.new_zeros(sum(send_sizes))
        if ok:
            try:
                base = 0
                for s, n in zip(send, send_sizes, strict=True):
                    for view, off in s.pieces(lo, lo + n):
                        out[base + off:base + off + view.numel()].copy_(view)
                    base += n
            except Exception:  # as above: zeros go out, the agreement fails the round
                log.exception("EP rank %d: staging MoE layer %d failed here", rank, rnd.layer)
                ok = False
        received = scratch.new_empty(sum(recv_sizes))
        dist.all_to_all_single(received, out, recv_sizes, send_sizes, group=group)
        base = 0
        for s, n in zip(recv, recv_sizes, strict=True):
            for view, off in s.pieces(lo, lo + n):
                view.copy_(received[base + off:base + off + view.numel()])
            base += n
    if parts[0].is_cuda:
        torch.cuda.current_stream(parts[0].device).synchronize()  # staged whole before anyone switches to it
    flag = torch.tensor([int(ok)], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)  # gloo beside NCCL on GPU
    return Staged(rnd, [m.slot - rank * per_rank for m in mine], rows, ok=bool(flag), layer=layer)


def own_rows(byte_rows: list[torch.Tensor], slot: int) -> list[torch.Tensor]:
    """Local slot `slot`'s expert as 1-D byte views, part after part (byte_rows: `slot_rows` of a layer)."""
    return [t[slot] for t in byte_rows]


def _copy_bytes(src: list[torch.Tensor], dst: list[torch.Tensor]) -> None:
    """Copy the byte stream made of views `src` into the one made of views `dst` (the same total size)."""
    out = _Stream(dst)
    if out.size != sum(v.numel() for v in src):
        raise ValueError(f"{out.size} bytes to write, {sum(v.numel() for v in src)} to read")
    base = 0
    for v in src:
        for view, off in out.pieces(base, base + v.numel()):
            view.copy_(v[off:off + view.numel()])
        base += v.numel()


def _schedule(rnd: Round, per_rank: int, ep_size: int, width: int, chunk_bytes: int) -> tuple[int, int]:
    """(bytes per peer per call, calls), the same on every rank: no rank moves more than `chunk_bytes` a call."""
    sends: dict[tuple[int, int], int] = {}
    for m in rnd.moves:
        src, dst = m.source // per_rank, m.slot // per_rank
        if src != dst:
            sends[src, dst] = sends.get((src, dst), 0) + width
    if not sends:
        return 1, 0
    peers = max(max(sum(1 for s, _ in sends if s == r), sum(1 for _, d in sends if d == r)) for r in range(ep_size))
    piece = max(1, chunk_bytes // peers)
    return piece, -(-max(sends.values()) // piece)

