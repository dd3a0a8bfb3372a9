"""`moemesh down`: stop the mesh `moemesh up --detach` started (found through its pid file)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from moemesh.services.cli import detach


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("down", help="stop the mesh `moemesh up --detach` started",
                       description="Stop the mesh `moemesh up --detach` started: SIGTERM to its processes, SIGKILL "
                                   "to those still there after --timeout; exits 1 when no mesh is running.")
    p.add_argument("--pid-file", default=None, metavar="PATH",
                   help="the pid file `moemesh up --detach` wrote (default: <cache>/up.pid, the cache being "
                        "$MOEMESH_CACHE_DIR or ~/.cache/moemesh)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="seconds to wait for the mesh to stop before killing what is left (default 30)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    pid_file = Path(args.pid_file).absolute() if args.pid_file else detach.default_pid_file()
    pid = detach.read_pid(pid_file)
    if pid is None:
        print(f"moemesh down: no mesh is running (no pid file at {pid_file}; `moemesh up --detach` writes it)",
              file=sys.stderr)
        return 1
    if not detach.is_moemesh_up(pid):
        _remove_files(pid_file, pid)
        print(f"moemesh down: no mesh is running (pid {pid} of {pid_file} is gone; removed the stale file)",
              file=sys.stderr)
        return 1
    outcome = detach.stop(pid, args.timeout)
    _remove_files(pid_file, pid)
    if outcome == detach.STUCK:
        print(f"moemesh down: the mesh (pid {pid}) is still there after SIGKILL", file=sys.stderr)
        return 1
    how = "" if outcome == detach.STOPPED else f" (killed: it did not stop within {args.timeout:g} s)"
    print(f"moemesh down: stopped the mesh (pid {pid}){how}")
    return 0


def _remove_files(pid_file: Path, pid: int) -> None:
    """The pid file, and the ready file beside it (a killed `up` could remove neither)."""
    detach.remove_pid_file(pid_file, pid)
    with contextlib.suppress(FileNotFoundError):
        detach.beside(pid_file, ".ready.json").unlink()
