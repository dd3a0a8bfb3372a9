"""Which device an engine runs on, and binding the threads that use it (their device, their priority).

CUDA's current device is per thread: a process that builds its engine on one thread (`asyncio.to_thread`) and
steps it on another must set it on both, or every kernel launch and allocation of an EP rank other than local
rank 0 lands on GPU 0 (what `torch.cuda.set_device` is for). Parsing stays free of torch so that command-line
parsers can use it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import re
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_ENV = "MOEMESH_DEVICE"
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def parse_device(value: str) -> str:
    """'cpu', 'cuda' or 'cuda:N' (argparse type); anything else is an error that says what is accepted."""
    if not _DEVICE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"device must be cpu, cuda or cuda:N, got {value!r}")
    return value


def default_device() -> str:
    """$MOEMESH_DEVICE when set (validated), else 'cpu'."""
    value = os.environ.get(DEVICE_ENV) or "cpu"
    try:
        return parse_device(value)
    except argparse.ArgumentTypeError as e:
        raise SystemExit(f"{DEVICE_ENV}: {e}") from None


def add_device_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup, help_extra: str = "") -> None:
    p.add_argument("--device", type=parse_device, default=default_device(),
                   help=f"where the model runs: cpu, cuda or cuda:N (default: ${DEVICE_ENV}, else cpu){help_extra}")


def bind_thread(device: str | torch.device) -> None:
    """Make `device` the calling thread's current CUDA device (nothing for other devices)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)


def lower_thread_priority(nice: int) -> bool:
    """Add `nice` to the calling thread's niceness (Linux: each thread has its own); False where it cannot.

    CFS then gives the other runnable work on the thread's cores (the gateway relaying tokens, kvtransfer, a client)
    the core first: a thread at +10 gets ~10% of a core that a nice-0 thread also wants.
    """
    if nice <= 0 or not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def new_threads_idle() -> Iterator[None]:
    """Threads that start inside the block run at the lowest CPU priority (Linux SCHED_IDLE; niceness 19 where that
    is refused); nothing elsewhere.

    For a library's threads that no caller can reach (gloo's worker threads and its transport's I/O loop, which
    `dist.new_group` starts): on a core shared with a serving step, a waking step thread then preempts them at once
    instead of waiting out their time slice, and they run in the step's idle time. They are not starved: CFS still
    gives an idle-class thread a small share of a busy core. Threads another thread starts meanwhile are lowered too,
    so the block should hold only the call that starts the ones meant.
    """
    tasks = "/proc/self/task"
    before = set(os.listdir(tasks)) if os.path.isdir(tasks) else None
    try:
        yield
    finally:
        if before is not None:
            for tid in set(os.listdir(tasks)) - before:
                _lower_to_idle(int(tid))


def lower_thread_to_idle() -> None:
    """Run the calling thread at the lowest CPU priority (as `new_threads_idle` does for the threads it sees start)."""
    if hasattr(threading, "get_native_id"):
        _lower_to_idle(threading.get_native_id())


def _lower_to_idle(tid: int) -> None:
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    except OSError:
        pass  # the thread is gone, or lowering is refused: it runs as it was


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` (at most 15 bytes) where the OS shows it: `top -H`, /proc/PID/task/TID/comm.
    Python before 3.14 names its threads for itself only. Nothing where the OS has no such name."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)  # 15: PR_SET_NAME
    except (OSError, AttributeError):
        pass
