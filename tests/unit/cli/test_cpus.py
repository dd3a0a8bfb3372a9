"""Core sets: MOEMESH_CPUS lists, `moemesh up`'s plan of which process runs where, and the CLI applying the list."""

from __future__ import annotations

import os

import pytest

from moemesh.service import cpus
from moemesh.service.cpus import CpuPlan, apply_from_env, format_cpus, parse_cpus, plan_cpus


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
    assert plan_cpus([0, 1], 1, 1) == CpuPlan([[1]], [0])
    assert plan_cpus([0, 1, 2, 3], 2, 1) == CpuPlan([[2], [3]], [0, 1])
    assert plan_cpus(range(16), 1, 8) == CpuPlan([list(range(8, 16))], list(range(8)))
    assert plan_cpus([4, 6, 5, 7], 1, 2) == CpuPlan([[6, 7]], [4, 5])  # whatever cores the host offers, in order
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
    from moemesh.services.cli.main import main

    monkeypatch.setenv(cpus.ENV, "0-x")
    assert main(["--version"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moemesh: error: MOEMESH_CPUS='0-x'") and "Traceback" not in err
