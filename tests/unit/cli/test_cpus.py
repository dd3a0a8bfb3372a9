"""Core sets: MOEMESH_CPUS lists, `moemesh up`'s plan of which process runs where, and the CLI applying the list."""

from __future__ import annotations

import argparse
import os

import pytest

from moemesh.service import cpus
from moemesh.service.cpus import CpuPlan, apply_from_env, format_cpus, parse_cpus, plan_cpus
from moemesh.services.cli import up
from moemesh.services.cli.main import main
from moemesh.services.cli.up import HostCores


@pytest.mark.parametrize(("text", "cores"), [("0", [0]), ("3,1", [1, 3]), ("0-2,5", [0, 1, 2, 5]),
                                             (" 4-5 , 7 ", [4, 5, 7]), ("1,1-2", [1, 2])])
def test_cpu_lists_parse_and_format_back(text: str, cores: list[int]) -> None:
    assert parse_cpus(text) == cores
    assert parse_cpus(format_cpus(cores)) == cores
    assert format_cpus([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


@pytest.mark.parametrize("text", ["", ",", "a", "1-", "-2", "3-1", "0;1", "1.5"])
def test_a_bad_cpu_list_is_refused_by_name(text: str) -> None:
    with pytest.raises(ValueError, match=cpus.ENV):
        parse_cpus(text)


def test_the_plan_gives_decode_workers_cores_of_their_own_and_the_rest_to_everything_else() -> None:
    # kvtransfer beside the first decode worker when it runs one thread; on the shared cores otherwise.
    assert plan_cpus([0, 1], 1, 1) == CpuPlan([[1]], [0], [1])
    assert plan_cpus([0, 1, 2, 3], 2, 1) == CpuPlan([[2], [3]], [0, 1], [2])
    assert plan_cpus(range(16), 1, 8) == CpuPlan([list(range(8, 16))], list(range(8)), list(range(8)))
    assert plan_cpus([4, 6, 5, 7], 1, 2) == CpuPlan([[6, 7]], [4, 5], [4, 5])  # the host's cores, in order
    # Nothing would be left for the others (or there is no decode worker): nothing is pinned.
    assert plan_cpus([0], 1, 1) is None
    assert plan_cpus([0, 1], 2, 1) is None
    assert plan_cpus([0, 1], 1, 2) is None
    assert plan_cpus([0, 1], 0, 1) is None


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_the_environment_confines_this_process_and_refuses_cores_it_may_not_use() -> None:
    before = os.sched_getaffinity(0)
    try:
        first = min(before)
        assert apply_from_env({cpus.ENV: str(first)}) == [first]
        assert os.sched_getaffinity(0) == {first}
        # Now only `first` is available: any other core is refused, with the ones it may use named.
        with pytest.raises(ValueError, match=f"may use {first}"):
            apply_from_env({cpus.ENV: str(first + 1)})
        assert apply_from_env({}) is None and apply_from_env({cpus.ENV: " "}) is None
    finally:
        os.sched_setaffinity(0, before)


def test_the_cli_refuses_a_bad_cpu_list_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(cpus.ENV, "0-x")
    assert main(["--version"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moemesh: error: MOEMESH_CPUS='0-x'") and "Traceback" not in err


@pytest.mark.parametrize(("cores", "extra", "device", "want_args", "want_decode", "want_shared", "want_kv"), [
    (4, [], "cpu", ["--procs-per-host", "2", "--num-threads", "2"], "2-3", "0-1", "0-1"),
    (2, [], "cpu", ["--procs-per-host", "2", "--num-threads", "1"], "1", "0", "1"),
    (1, [], "cpu", ["--procs-per-host", "2"], None, None, None),  # nothing left for the others: not pinned
    (2, [], "cuda", ["--procs-per-host", "2"], None, None, None),
    (4, ["--num-threads", "3"], "cpu", ["--procs-per-host", "2"], "3-5", None, None),  # 3 of 4 cores: pins 1-3
    (8, ["--procs-per-host=4"], "cpu", ["--num-threads", "2"], "6-7", "0-5", "0-5"),  # the user's count, not repeated
])
def test_up_gives_workers_their_threads_and_cores(monkeypatch: pytest.MonkeyPatch, cores: int, extra: list[str],
                                                  device: str, want_args: list[str], want_decode: str | None,
                                                  want_shared: str | None, want_kv: str | None) -> None:
    monkeypatch.setattr(cpus, "available_cpus", lambda: list(range(cores)))
    args = argparse.Namespace(prefill=1, decode=1, ep_size=1, pin="auto", device=device)
    plan = HostCores.for_mesh(args, extra)
    assert plan.worker_args("decode", 0) == want_args
    if want_decode is None:
        assert plan.pinned is None and plan.env({"A": "1"}, "decode", 0) == {"A": "1"}
        return
    if extra[:1] == ["--num-threads"]:  # the user's 3 threads: 3 cores of 4 for decode, 1 shared
        assert plan.env({}, "decode", 0)[cpus.ENV] == "1-3" and plan.env({}, "gateway", 0)[cpus.ENV] == "0"
        return
    assert plan.env({}, "decode", 0)[cpus.ENV] == want_decode
    assert plan.env({}, "prefill", 0)[cpus.ENV] == plan.env({}, "service", 0)[cpus.ENV] == want_shared
    assert plan.env({}, "kvtransfer", 0)[cpus.ENV] == want_kv
    assert HostCores.for_mesh(argparse.Namespace(**{**vars(args), "pin": "off"}), extra).pinned is None


@pytest.mark.parametrize(("ep_size", "extra", "want"), [
    (1, [], ["--batch-wait-ms", str(up.PREFILL_BATCH_WAIT_MS)]),
    (1, ["--batch-wait-ms", "0"], []),  # the user's own value reaches the workers through the extra options
    (4, [], []),  # EP ranks vote on every step together: a wait would not gather anything
])
def test_up_gives_prefill_workers_a_batch_wait(monkeypatch: pytest.MonkeyPatch, ep_size: int, extra: list[str],
                                               want: list[str]) -> None:
    monkeypatch.setattr(cpus, "available_cpus", lambda: [0, 1])
    args = argparse.Namespace(prefill=1, decode=1, ep_size=ep_size, pin="auto", device="cpu")
    plan = HostCores.for_mesh(args, extra)
    prefill, decode = plan.worker_args("prefill", 0), plan.worker_args("decode", 0)
    at = prefill.index("--batch-wait-ms") if "--batch-wait-ms" in prefill else len(prefill)
    assert prefill[at:at + 2] == want and "--batch-wait-ms" not in decode


def test_a_gateway_is_started_again_unless_it_keeps_dying() -> None:
    from moemesh.services.cli.up import GATEWAY_RESTART_WINDOW_S, GATEWAY_RESTARTS, GatewayRestarts

    restarts = GatewayRestarts()
    assert all(restarts.allow("gateway", now=float(t)) for t in range(GATEWAY_RESTARTS - 1))
    assert not restarts.allow("gateway", now=float(GATEWAY_RESTARTS))  # the third death within the window
    assert restarts.allow("gateway-1", now=float(GATEWAY_RESTARTS))  # counted per gateway
    later = GATEWAY_RESTARTS + GATEWAY_RESTART_WINDOW_S + 1
    assert restarts.allow("gateway", now=later)  # the old deaths left the window
