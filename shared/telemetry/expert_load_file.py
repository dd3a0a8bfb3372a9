"""Expert load records: what workers write with `--record-expert-load FILE`, and its reader.

JSON Lines, one window a line:
    {"t": 1718000000.5, "role": "decode", "instance_id": "decode-0", "rank": 0, "counts": [[3, 0, ...], ...]}
t: unix seconds (float) at the window's end; role: "prefill" or "decode"; instance_id: the EP group;
rank: the EP rank that routed the tokens; counts [L, E]: tokens it routed to each (MoE layer, logical expert)
during the window.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

ROLES = ("prefill", "decode")
_KEYS = ("t", "role", "instance_id", "rank", "counts")


class StatsFileError(ValueError):
    """A stats file that cannot be read or a window that cannot be written; names the path and line."""


@dataclass(frozen=True, eq=False)
class Window:
    """One line of a stats file. counts [L, E] int64: tokens routed to each (MoE layer, logical expert)."""

    t: float
    role: str
    instance_id: str
    rank: int
    counts: torch.Tensor


def append_window(path: str | os.PathLike, counts: torch.Tensor | Sequence[Sequence[int]], role: str,
                  instance_id: str, rank: int, t: float | None = None) -> None:
    """Append one window (counts [L, E] integer tokens, on any device) to the stats file at `path`.

    `t` defaults to now. The line goes out in one write to a file opened for appending, so the ranks of a
    group can share one file on a local filesystem without interleaving their lines.
    """
    try:
        counts = torch.as_tensor(counts)
    except (TypeError, ValueError, RuntimeError) as e:
        raise StatsFileError(f"{path}: counts must be an [L, E] table of ints: {e}") from None
    if counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
        raise StatsFileError(f"{path}: counts must be integers, got dtype {counts.dtype}")
    if counts.dim() != 2:
        raise StatsFileError(f"{path}: counts must be [L, E], got shape {list(counts.shape)}")
    rows = counts.detach().cpu().tolist()
    window = {"t": time.time() if t is None else float(t), "role": role, "instance_id": instance_id,
              "rank": rank, "counts": rows}
    _check(window, str(path))
    line = (json.dumps(window, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_windows(path: str | os.PathLike) -> list[Window]:
    """Every window of the stats file at `path`, in file order; blank lines are skipped.

    Raises StatsFileError naming the path and line number for a line that is not a window, or whose counts
    differ in shape from the first window's.
    """
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise StatsFileError(f"cannot read stats file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise StatsFileError(f"stats file {path} is not text: {e}") from None
    windows: list[Window] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise StatsFileError(f"{where}: not a JSON object ({e.msg})") from None
        _check(data, where)
        counts = torch.tensor(data["counts"], dtype=torch.int64)
        if windows and counts.shape != windows[0].counts.shape:
            raise StatsFileError(f"{where}: counts have shape {list(counts.shape)}, the first window's "
                                 f"{list(windows[0].counts.shape)}")
        windows.append(Window(float(data["t"]), data["role"], data["instance_id"], data["rank"], counts))
    return windows


def _check(data: object, where: str) -> None:
    """Raise StatsFileError unless `data` is a well-formed window."""
    if not isinstance(data, dict):
        raise StatsFileError(f"{where}: expected a JSON object with keys {', '.join(_KEYS)}")
    missing = [k for k in _KEYS if k not in data]
    if missing:
        raise StatsFileError(f"{where}: missing key(s) {', '.join(missing)}")
    t = data["t"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise StatsFileError(f"{where}: t must be unix seconds (a number), got {t!r}")
    if data["role"] not in ROLES:
        raise StatsFileError(f"{where}: role must be one of {', '.join(ROLES)}, got {data['role']!r}")
    if not isinstance(data["instance_id"], str):
        raise StatsFileError(f"{where}: instance_id must be a string, got {data['instance_id']!r}")
    rank = data["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise StatsFileError(f"{where}: rank must be an int >= 0, got {rank!r}")
    rows = data["counts"]
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise StatsFileError(f"{where}: counts must be a non-empty [L, E] list of lists (one per MoE layer)")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise StatsFileError(f"{where}: counts rows differ in length: {sorted(widths)}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for r in rows for v in r):
        raise StatsFileError(f"{where}: counts must be ints >= 0")
