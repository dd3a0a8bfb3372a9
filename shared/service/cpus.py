"""Which cores a service process runs on: `MOEMESH_CPUS`, and `moemesh up`'s plan for one host.

On a small CPU host the processes of a mesh (gateway, kvtransfer, the balancer, prefill and decode workers, and
whatever client drives them) outnumber the cores. Left to the OS scheduler, a decode worker's engine thread is
preempted by every burst of the others, and each step pays for it. `moemesh up` therefore gives each decode worker
cores of its own and lets everything else share the rest (vLLM's CPU backend likewise binds its engine's threads
to cores and leaves the front end the others). Measured on the small benchmark shape, 2 cores: docs/benchmarks.md.

`MOEMESH_CPUS=0,2-3` confines a process to those cores: read at the start of the `moemesh` command, before any
thread exists, so that every thread it makes (torch's, gRPC's) inherits the set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ENV = "MOEMESH_CPUS"


def parse_cpus(text: str) -> list[int]:
    """A Linux CPU list ("0", "0,2", "1-3,6") -> sorted core numbers; ValueError when it is not one."""
    cores: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{ENV}={text!r}: not a CPU list (e.g. 0,2-3)")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"{ENV}={text!r}: the range {part} runs backwards")
        cores.update(range(first, last + 1))
    if not cores:
        raise ValueError(f"{ENV}={text!r}: no CPU in it")
    return sorted(cores)


def format_cpus(cores: Sequence[int]) -> str:
    """Core numbers -> a CPU list, ranges joined ([0, 1, 2, 5] -> "0-2,5")."""
    out: list[str] = []
    ordered = sorted(set(cores))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


def available_cpus() -> list[int]:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def default_threads(procs_per_host: int, cores: int | None = None) -> int:
    """Threads for one engine process when `procs_per_host` of them share `cores` evenly (default: the cores this
    process may run on)."""
    cores = len(available_cpus()) if cores is None else cores
    return max(1, cores // max(1, procs_per_host))


def apply_from_env(environ: Mapping[str, str] | None = None) -> list[int] | None:
    """Confine this process to `MOEMESH_CPUS` when it is set (None when not); ValueError for a bad list or cores
    this process may not use."""
    text = (os.environ if environ is None else environ).get(ENV, "").strip()
    if not text:
        return None
    cores = parse_cpus(text)
    allowed = set(available_cpus())
    if not set(cores) <= allowed:
        raise ValueError(f"{ENV}={text!r}: cores {format_cpus(sorted(set(cores) - allowed))} are not available to "
                         f"this process (it may use {format_cpus(sorted(allowed))})")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    return cores


@dataclass(frozen=True)
class CpuPlan:
    """Cores of one host: `decode[i]` for decode worker i, `kvtransfer` for kvtransfer, `shared` for every other
    process."""

    decode: list[list[int]]
    shared: list[int]
    kvtransfer: list[int]


def plan_cpus(cores: Sequence[int], num_decode: int, threads: int) -> CpuPlan | None:
    """Give each of `num_decode` decode workers `threads` cores of its own (the last ones), the rest to all other
    processes; None when that would leave the others no core (then nothing is pinned).

    kvtransfer joins the first decode worker's core when that worker runs one thread: its relay carries the KV
    into the decode worker in short bursts that fit between decode steps, whereas on the shared cores they wait
    behind the prefill worker's long steps and the gateway (on 2 cores, three A/B pairs: mean TTFT 16-31% and p99
    TTFT 16-54% lower, output tokens/s and mean ITL better in two pairs of three; docs/benchmarks.md). With the tcp
    plane it carries no KV, only a few small calls a request, and stays there (not measured against the shared
    cores). A decode worker of several threads keeps its cores alone: one thread preempted there holds up the
    others at every barrier of a parallel region.
    """
    cores = sorted(cores)
    need = num_decode * threads
    if num_decode < 1 or threads < 1 or need >= len(cores):
        return None
    shared = cores[: len(cores) - need]
    own = cores[len(shared):]
    decode = [own[i * threads:(i + 1) * threads] for i in range(num_decode)]
    return CpuPlan(decode, shared, decode[0] if threads == 1 else shared)


# `moemesh up` runs a prefill worker's engine thread at this niceness where it shares its cores with the services.
SHARED_ENGINE_NICE = 10
