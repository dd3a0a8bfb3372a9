"""Starting moemesh service processes from a launcher (`moemesh up`, an EP group's launcher, benchmarks, tests)."""

from __future__ import annotations

import ctypes
import signal


def die_with_parent() -> None:
    """In the child (a `preexec_fn`): get SIGTERM when the launcher dies, however it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass
