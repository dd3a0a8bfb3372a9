"""Moving expert weights to a new placement, one MoE layer at a time, between the ranks of an EP group.

Every rank computes the same plan from the old and the new placement: a new slot's expert is copied
locally when the rank already holds it, else received from the lowest rank that holds it; one uneven
`all_to_all_single` per layer carries all of it. Replicas are exact copies, so outputs do not change.

Legend: S local slots, I expert intermediate size, D hidden.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moemesh.ep.experts import EPExperts
from moemesh.ep.placement import ExpertPlacement


def migrate_layer(experts: EPExperts, new: ExpertPlacement, group: dist.ProcessGroup | None = None) -> int:
    """Give `experts` (this rank's slots of one MoE layer) the weights `new` puts there; a collective.

    Returns the number of expert weights this rank received from others.
    """
    old, layer = experts.placement, experts.layer
    rank, size = experts.dispatcher.rank, experts.dispatcher.ep_size
    if (new.num_physical, new.ep_size, new.num_logical) != (old.num_physical, old.ep_size, old.num_logical):
        raise ValueError("a new placement must keep the number of slots, ranks and experts")
    per_rank = old.slots_per_rank
    old_row, new_row = old.phy2log[layer].tolist(), new.phy2log[layer].tolist()
    held = [old_row[r * per_rank:(r + 1) * per_rank] for r in range(size)]

    def source(dest: int, expert: int) -> int:
        return dest if expert in held[dest] else next(r for r in range(size) if expert in held[r])

    # Each slot's expert as one row of bytes (weights, and FP8 block scales where kept), whatever the dtypes.
    parts = experts.slot_tensors()
    flat = torch.cat([t.contiguous().view(torch.uint8).reshape(per_rank, -1) for t in parts], dim=1)
    send_rows: list[torch.Tensor] = []
    send_counts, recv_counts = [0] * size, [0] * size
    for dest in range(size):
        for expert in new_row[dest * per_rank:(dest + 1) * per_rank]:
            src = source(dest, expert)
            if src == rank and dest != rank:
                send_rows.append(flat[held[rank].index(expert)])
                send_counts[dest] += 1
            elif dest == rank and src != rank:
                recv_counts[src] += 1
    width = flat.shape[1]
    send = torch.stack(send_rows) if send_rows else flat.new_empty(0, width)
    recv = flat.new_empty(sum(recv_counts), width)
    dist.all_to_all_single(recv.view(-1), send.reshape(-1), [c * width for c in recv_counts],
                           [c * width for c in send_counts], group=group)
    # Received rows arrive grouped by source rank, each group in this rank's slot order.
    offsets = [sum(recv_counts[:r]) for r in range(size)]
    rows = []
    for expert in new_row[rank * per_rank:(rank + 1) * per_rank]:
        src = source(rank, expert)
        if src == rank:
            rows.append(flat[held[rank].index(expert)])
        else:
            rows.append(recv[offsets[src]])
            offsets[src] += 1
    new_flat = torch.stack(rows)
    widths = [t[0].numel() * t.element_size() for t in parts]
    pieces = new_flat.split(widths, dim=1)
    experts.set_weights(new, *(piece.contiguous().view(t.dtype).reshape(t.shape)
                               for piece, t in zip(pieces, parts, strict=True)))
    return sum(recv_counts)
