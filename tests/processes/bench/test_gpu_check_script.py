"""bench/gpu_check.sh, the one prepared GPU check, run for real on a machine without a GPU: it parses, lists its steps,
reports every step as SKIP with its reason (no FAIL, no traceback) in one JSON report, and records the steps a spent
budget left out. With GPU_CHECK_DEVICE=cpu the generate and mesh steps run end to end on the CPU (cpu against cpu),
so that their processes, their comparisons and the mesh's stop are exercised before a GPU run depends on them.

The steps' functions, in-process, are in tests/unit/bench/test_gpu_check.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.paths import ROOT
from tests.unit.bench.test_gpu_check import ENTRY_KEYS, ISSUE_STEPS

SCRIPT = ROOT / "bench" / "gpu_check.sh"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the steps would run")


def _script(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def _report(path: Path) -> dict:
    doc = json.loads(path.read_text())
    for entry in doc["steps"]:
        assert set(entry) == ENTRY_KEYS
    return doc


def test_the_script_parses() -> None:
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_list_prints_the_steps_and_a_wrong_one_is_a_usage_error() -> None:
    proc = _script("--list")
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ISSUE_STEPS
    wrong = _script("--only", "generate,nope")
    assert wrong.returncode == 2 and "unknown step 'nope'" in wrong.stderr


@no_gpu
def test_without_a_gpu_every_step_skips_saying_why(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "V3_LAYER_DIR"}
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env={**env, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [[name, "SKIP"] for name in ISSUE_STEPS]
    assert lines[-1].startswith("gpu_check: SKIP: 0 PASS, 0 FAIL, 7 SKIP")
    doc = _report(tmp_path / "gpu_check.json")
    assert [e["name"] for e in doc["steps"]] == ISSUE_STEPS
    reasons = {e["name"]: e["details"]["reason"] for e in doc["steps"]}
    assert reasons["generate"].startswith("no CUDA device") and reasons["deepgemm"].startswith("deep_gemm is not")
    assert reasons["v3-layer-decode"].startswith("V3_LAYER_DIR is not set")


def test_generate_and_mesh_pass_on_the_cpu_and_leave_nothing_running(tmp_path: Path) -> None:
    work = tmp_path / "work"
    proc = _script("--only", "mesh", "--only", "generate", str(tmp_path / "out"), timeout=300,
                   GPU_CHECK_DEVICE="cpu", GPU_CHECK_WORK=str(work))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = _report(tmp_path / "out" / "gpu_check.json")
    assert [(e["name"], e["status"]) for e in doc["steps"]] == [("generate", "PASS"), ("mesh", "PASS")]
    generate, mesh = doc["steps"]
    assert all(r["first_divergence"] is None for r in generate["details"]["float32"])
    assert all(r["first_divergence"] is None and r["text_equal"] for r in mesh["details"]["prompts"])
    assert mesh["details"]["stop"].startswith("SIGTERM")
    assert (work / "logs" / "mesh" / "mesh.log").is_file() and not list((work / "pids").iterdir())


def test_a_spent_budget_records_the_steps_it_left_out(tmp_path: Path) -> None:
    proc = _script("--only", "generate,deepgemm", str(tmp_path), GPU_CHECK_BUDGET="0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = _report(tmp_path / "gpu_check.json")
    assert [(e["name"], e["status"]) for e in doc["steps"]] == [("generate", "FAIL"), ("deepgemm", "FAIL")]
    assert all(e["summary"].startswith("not run: the check's 0 s budget") for e in doc["steps"])


def test_sigterm_at_the_cap_stops_the_mesh_and_still_reports(tmp_path: Path) -> None:
    """What `timeout` does at a step's cap: the step stops its mesh's whole process group and writes a FAIL."""
    pids, result = tmp_path / "pids", tmp_path / "mesh.json"
    step = subprocess.Popen([sys.executable, "-m", "moemesh.bench.gpu_check", "mesh", "--device", "cpu", "--json",
                             str(result), "--pid-dir", str(pids), "--work-dir", str(tmp_path / "work")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (pids.is_dir() and list(pids.glob("*.pgid"))):
            assert step.poll() is None and time.monotonic() < deadline, step.communicate()
            time.sleep(0.2)
        pgid = int(next(pids.glob("*.pgid")).read_text())
        time.sleep(3)  # the mesh's services are starting: the stop must take them too
        step.send_signal(signal.SIGTERM)
        out, err = step.communicate(timeout=60)
    finally:
        if step.poll() is None:
            step.kill()
            step.wait(10)
    assert step.returncode == 1, out + err
    entry = _report(result)["steps"][0]
    assert (entry["name"], entry["status"]) == ("mesh", "FAIL") and "SIGTERM" in entry["summary"]
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    assert not list(pids.glob("*.pgid"))


def test_the_script_stops_a_process_group_a_killed_step_left_behind(tmp_path: Path) -> None:
    """A step killed at its cap cannot stop the mesh it started; the script stops the group the step named."""
    work = tmp_path / "work"
    (work / "pids").mkdir(parents=True)
    orphan = subprocess.Popen(["sleep", "300"], start_new_session=True)
    # Reaped as soon as it ends, as init reaps a killed step's orphans: a zombie would still count as running.
    reaper = threading.Thread(target=orphan.wait, daemon=True)
    reaper.start()
    try:
        (work / "pids" / f"{orphan.pid}.pgid").write_text(f"{orphan.pid}\n")
        proc = _script("--only", "v3-layer-decode", str(tmp_path / "out"), GPU_CHECK_WORK=str(work))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"stopping process group {orphan.pid} left by a step" in proc.stderr
        reaper.join(10)
        assert orphan.returncode == -signal.SIGTERM
        assert not list((work / "pids").iterdir())
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait(10)
