"""What an engine thread sets on itself: its niceness (`lower_thread_priority`: the calling thread alone, Linux threads
have their own) and its name as the OS shows it (`name_os_thread`)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from moemesh.device import lower_thread_priority, lower_thread_to_idle, name_os_thread, new_threads_idle


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_only_the_calling_thread_gets_nicer() -> None:
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: dict[str, object] = {}

    def worker() -> None:
        tid = threading.get_native_id()
        seen["start"] = os.getpriority(os.PRIO_PROCESS, tid)
        seen["lowered"] = lower_thread_priority(3)
        seen["after"] = os.getpriority(os.PRIO_PROCESS, tid)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["lowered"] is True
    assert seen["after"] == min(19, int(seen["start"]) + 3)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # this thread untouched


def test_zero_or_less_changes_nothing() -> None:
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert lower_thread_priority(0) is False and lower_thread_priority(-5) is False
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_the_os_sees_the_thread_name() -> None:
    seen: dict[str, str] = {}

    def worker() -> None:
        name_os_thread("engine-of-a-long-name")
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            seen["comm"] = f.read().strip()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["comm"] == "engine-of-a-lon"  # the OS keeps 15 bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread scheduling classes are Linux's")
def test_threads_started_inside_the_block_run_idle_and_the_others_do_not() -> None:
    """`new_threads_idle` (what an EP group wraps around its switch group's creation, whose gloo threads it cannot
    reach otherwise) and `lower_thread_to_idle` (the switch's copy thread)."""
    release = threading.Event()
    threads: dict[str, threading.Thread] = {}
    own: dict[str, int] = {}

    def lowers_itself() -> None:
        lower_thread_to_idle()
        own["policy"] = os.sched_getscheduler(threading.get_native_id())
        release.wait()

    threads["before"] = threading.Thread(target=release.wait)
    threads["before"].start()
    with new_threads_idle():
        threads["inside"] = threading.Thread(target=release.wait)
        threads["inside"].start()
    threads["after"] = threading.Thread(target=release.wait)
    threads["after"].start()
    threads["self"] = threading.Thread(target=lowers_itself)
    threads["self"].start()
    try:
        while "policy" not in own:
            threading.Event().wait(0.01)
        policy = {name: os.sched_getscheduler(t.native_id) for name, t in threads.items()}
    finally:
        release.set()
        for t in threads.values():
            t.join()
    assert policy == {"before": os.SCHED_OTHER, "inside": os.SCHED_IDLE, "after": os.SCHED_OTHER,
                      "self": os.SCHED_IDLE}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller itself is untouched
