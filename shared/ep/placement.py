"""Expert placement for one EP group: which logical expert each physical expert slot holds, per MoE layer.

Legend: L MoE layers (in model order), E logical experts, P physical slots (E plus redundant replicas),
T tokens, K experts per token. Rank r of an `ep_size`-rank group holds slots [r * P/ep_size, (r+1) * P/ep_size).

Pure tensors: nothing here touches torch.distributed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch


class PlacementError(ValueError):
    """A placement that is inconsistent, or a placement file that cannot be read."""


@dataclass(frozen=True, eq=False)
class ExpertPlacement:
    """Which logical expert each physical expert slot holds, per MoE layer.

    phy2log [L, P] int64: logical expert of physical slot p in MoE layer l (L = number of MoE layers, in model order).
    ep_size: ranks; rank r holds slots [r * P/ep_size, (r+1) * P/ep_size).
    num_logical: E; derived as max(phy2log) + 1 when not given, checked against it when given.

    Derived and validated in __post_init__:
    log2phy [L, E, max_replicas] int64: physical slots of each logical expert, in increasing slot order,
        padded with -1.
    logcnt [L, E] int64: replica counts (every logical expert has at least one in every layer).

    The tensors live on the CPU; `physical_ids` keeps a copy per device it is called on.
    """

    phy2log: torch.Tensor
    ep_size: int
    num_logical: int | None = None
    log2phy: torch.Tensor = field(init=False)
    logcnt: torch.Tensor = field(init=False)
    _by_device: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        phy2log = self.phy2log
        if not isinstance(phy2log, torch.Tensor):
            try:
                phy2log = torch.as_tensor(phy2log)
            except (TypeError, ValueError, RuntimeError) as e:
                raise PlacementError(f"phy2log must be an [L, P] integer tensor: {e}") from None
        if phy2log.dtype == torch.bool or phy2log.is_floating_point() or phy2log.is_complex():
            raise PlacementError(f"phy2log must be an integer tensor, got dtype {phy2log.dtype}")
        if phy2log.dim() != 2:
            raise PlacementError(f"phy2log must be [L, P] (2-D), got shape {tuple(phy2log.shape)}")
        num_layers, num_physical = phy2log.shape
        if num_layers < 1 or num_physical < 1:
            raise PlacementError(f"phy2log must have at least one layer and one slot, got shape {tuple(phy2log.shape)}")
        phy2log = phy2log.detach().to(device="cpu", dtype=torch.int64).contiguous()

        ep_size = self.ep_size
        if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
            raise PlacementError(f"ep_size must be a positive int, got {ep_size!r}")
        if num_physical % ep_size != 0:
            raise PlacementError(
                f"num_physical = {num_physical} slots is not divisible by ep_size = {ep_size}; "
                f"every rank must hold the same number of slots"
            )

        lo, hi = int(phy2log.min()), int(phy2log.max())
        num_logical = self.num_logical
        if num_logical is None:
            num_logical = hi + 1
        elif isinstance(num_logical, bool) or not isinstance(num_logical, int) or num_logical < 1:
            raise PlacementError(f"num_logical must be a positive int, got {num_logical!r}")
        if lo < 0 or hi >= num_logical:
            raise PlacementError(
                f"phy2log values must lie in [0, {num_logical}) for num_logical = {num_logical}, got range [{lo}, {hi}]"
            )
        if num_physical < num_logical:
            raise PlacementError(f"num_physical = {num_physical} slots cannot hold num_logical = {num_logical} experts")

        # Replica counts, and each slot's position among its expert's replicas (stable sort keeps slot order).
        layer_idx = torch.arange(num_layers).unsqueeze(1)
        logcnt = torch.zeros(num_layers, num_logical, dtype=torch.int64)
        logcnt.scatter_add_(1, phy2log, torch.ones_like(phy2log))
        missing = (logcnt == 0).nonzero()
        if missing.numel():
            layer, expert = (int(v) for v in missing[0])
            raise PlacementError(
                f"logical expert {expert} has no physical slot in MoE layer {layer} "
                f"({missing.shape[0]} (layer, expert) pairs missing in all); every expert needs at least one"
            )
        order = torch.sort(phy2log, dim=1, stable=True).indices  # [L, P] slots grouped by expert, ascending
        sorted_log = phy2log.gather(1, order)
        starts = logcnt.cumsum(dim=1) - logcnt  # [L, E] first position of each expert in `order`
        replica = torch.arange(num_physical).unsqueeze(0) - starts.gather(1, sorted_log)  # [L, P]
        log2phy = torch.full((num_layers, num_logical, int(logcnt.max())), -1, dtype=torch.int64)
        log2phy[layer_idx, sorted_log, replica] = order

        object.__setattr__(self, "phy2log", phy2log)
        object.__setattr__(self, "num_logical", num_logical)
        object.__setattr__(self, "log2phy", log2phy)
        object.__setattr__(self, "logcnt", logcnt)
        object.__setattr__(self, "_by_device", {})

    # ---- shape ----------------------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_physical(self) -> int:
        return self.phy2log.shape[1]

    @property
    def slots_per_rank(self) -> int:
        return self.num_physical // self.ep_size

    def local_slots(self, rank: int) -> range:
        """The physical slots rank `rank` holds: [rank * P/ep_size, (rank+1) * P/ep_size)."""
        if not 0 <= rank < self.ep_size:
            raise PlacementError(f"rank {rank} out of range for ep_size = {self.ep_size}")
        n = self.slots_per_rank
        return range(rank * n, (rank + 1) * n)

    def rank_of_slot(self, slot: int | torch.Tensor) -> int | torch.Tensor:
        """The rank holding physical slot `slot` (an int, or elementwise over an integer tensor)."""
        if isinstance(slot, torch.Tensor):
            return torch.div(slot, self.slots_per_rank, rounding_mode="floor")
        if not 0 <= slot < self.num_physical:
            raise PlacementError(f"slot {slot} out of range for num_physical = {self.num_physical}")
        return slot // self.slots_per_rank

    # ---- constructors ---------------------------------------------------------------------------------------------

    @classmethod
    def default(cls, num_layers: int, num_logical: int, ep_size: int, redundant: int = 0) -> ExpertPlacement:
        """P = E + R slots in every layer: slots 0..E-1 hold experts 0..E-1 in order, the R redundant slots hold
        experts 0..R-1 again (modulo E). A later balancer (EPLB) chooses better."""
        for name, value, least in (
            ("num_layers", num_layers, 1),
            ("num_logical", num_logical, 1),
            ("ep_size", ep_size, 1),
            ("redundant", redundant, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise PlacementError(f"{name} must be an int >= {least}, got {value!r}")
        num_physical = num_logical + redundant
        if num_physical % ep_size != 0:
            raise PlacementError(
                f"num_physical = num_logical + redundant = {num_logical} + {redundant} = {num_physical} "
                f"is not divisible by ep_size = {ep_size}"
            )
        row = torch.cat([torch.arange(num_logical), torch.arange(redundant) % num_logical])
        return cls(row.unsqueeze(0).repeat(num_layers, 1), ep_size, num_logical)

    @classmethod
    def from_file(cls, path: str | os.PathLike, num_logical: int) -> ExpertPlacement:
        """Reads JSON {"ep_size": K, "phy2log": [[...], ...]} (one row per MoE layer) written by `to_file`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise PlacementError(f"cannot read placement file {path}: {e}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlacementError(f"placement file {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise PlacementError(f'placement file {path}: expected an object {{"ep_size": ..., "phy2log": ...}}')
        missing = [key for key in ("ep_size", "phy2log") if key not in data]
        if missing:
            raise PlacementError(f"placement file {path}: missing key(s) {', '.join(missing)}")
        ep_size, rows = data["ep_size"], data["phy2log"]
        if isinstance(ep_size, bool) or not isinstance(ep_size, int):
            raise PlacementError(f"placement file {path}: ep_size must be an int, got {ep_size!r}")
        if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
            raise PlacementError(f"placement file {path}: phy2log must be a non-empty list of lists (one per layer)")
        widths = {len(r) for r in rows}
        if len(widths) != 1:
            raise PlacementError(f"placement file {path}: phy2log rows differ in length: {sorted(widths)}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for r in rows for v in r):
            raise PlacementError(f"placement file {path}: phy2log entries must be ints")
        try:
            return cls(torch.tensor(rows, dtype=torch.int64), ep_size, num_logical)
        except PlacementError as e:
            raise PlacementError(f"placement file {path}: {e}") from None

    def to_file(self, path: str | os.PathLike) -> None:
        """Writes the JSON `from_file` reads, one layer per line, replacing the file atomically."""
        path = Path(path)
        rows = ",\n".join("    " + json.dumps(row) for row in self.phy2log.tolist())
        text = f'{{\n  "ep_size": {self.ep_size},\n  "phy2log": [\n{rows}\n  ]\n}}\n'
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    # ---- routing --------------------------------------------------------------------------------------------------

    def physical_ids(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """topk_ids [T, K] int64 logical -> [T, K] int64 physical slots, on topk_ids' device.

        Tokens routed to an expert with replicas are spread over them deterministically: the replica index of
        entry (t, k) is (t * K + k) % logcnt[layer, e]. Negative ids (padding) map to -1. Ids >= E are an error
        (an index error on CPU, a device assert on GPU; not checked here to avoid a sync).
        """
        if not 0 <= layer < self.num_layers:
            raise PlacementError(f"layer {layer} out of range for num_layers = {self.num_layers}")
        if topk_ids.dim() != 2:
            raise PlacementError(f"topk_ids must be [T, K], got shape {tuple(topk_ids.shape)}")
        log2phy, logcnt = self._tables(topk_ids.device)
        log2phy, logcnt = log2phy[layer], logcnt[layer]
        ids = topk_ids.long()
        valid = ids >= 0
        safe = ids.clamp(min=0)
        t, k = ids.shape
        flat_pos = torch.arange(t * k, device=ids.device, dtype=torch.int64).view(t, k)
        replica = flat_pos % logcnt[safe]
        return torch.where(valid, log2phy[safe, replica], torch.full_like(ids, -1))

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(log2phy, logcnt) on `device`, copied once per device."""
        if device.type == "cpu":
            return self.log2phy, self.logcnt
        cached = self._by_device.get(device)
        if cached is None:
            cached = (self.log2phy.to(device), self.logcnt.to(device))
            self._by_device[device] = cached
        return cached
