"""One prepared check of moemesh on one NVIDIA GPU (issue 13): each step prints one line and writes a JSON report.

bench/gpu_check.sh runs every step as its own process under a time cap and merges their reports; each step also runs
alone (`python -m moemesh.bench.gpu_check STEP`). `--list` prints the steps, their caps and what they check.

A step never raises. It ends PASS or FAIL by its own rule (in its function's doc, and stated in its line), or SKIP
when it cannot run here (no CUDA device, no deep_gemm, no V3_LAYER_DIR), saying why; an exception is a FAIL that
carries its message (its traceback goes to stderr). `--device cpu` runs a step's logic on the CPU: what the tests do,
so that the comparisons themselves are exercised on machines without a GPU.

Usage, from the repository root:
    python -m moemesh.bench.gpu_check --list
    python -m moemesh.bench.gpu_check STEP [STEP ...] [--json FILE] [--time-limit S] [--work-dir DIR] [--device cpu]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moemesh.bench.gpu_check_base import (
    FAIL,
    MARGIN_S,
    PASS,
    SKIP,
    Context,
    Outcome,
    Skip,
    StepResult,
    Terminated,
    jsonable,
)
from moemesh.bench.gpu_check_kernels import (
    step_deepgemm,
    step_grouped_gemm,
    step_moe_layer_tflops,
    step_v3_layer_decode,
)
from moemesh.bench.gpu_check_serving import step_fake_device_tests, step_generate, step_mesh

if TYPE_CHECKING:
    pass

REPORT_VERSION = 1


# ---- the steps, the report, the command line ------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Context], Outcome]
    cap_s: int  # what bench/gpu_check.sh gives it at most (all caps together may exceed the check's budget)
    what: str


STEPS: dict[str, Step] = {s.name: s for s in (
    Step("fake-device-tests-for-real", step_fake_device_tests, 90,
         "tests/unit/engine/test_device_discipline.py on the real GPU (MOEMESH_TEST_REAL_CUDA=1)"),
    Step("generate", step_generate, 60, "moemesh generate --device cuda (float32, bfloat16) against --device cpu"),
    Step("mesh", step_mesh, 120, "moemesh up --device cuda, REST /v1/completions against cpu generate, stopped"),
    Step("grouped-gemm", step_grouped_gemm, 60,
         "torch._grouped_mm against plain torch, bf16, V3 expert dims, 32 skewed slots: error, TFLOP/s"),
    Step("deepgemm", step_deepgemm, 150, "DeepGEMM FP8 contiguous and masked against FP8 and bf16 references"),
    Step("moe-layer-tflops", step_moe_layer_tflops, 60,
         "one V3 MoE layer's routed experts on one EP-8 rank, TFLOP/s as a fraction of the bf16 mm peak"),
    Step("v3-layer-decode", step_v3_layer_decode, 120, "decode tok/s of the v3-layer checkpoint in $V3_LAYER_DIR"),
)}


def _one_line(text: str, limit: int = 300) -> str:
    text = " | ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def run_step(step: Step, ctx: Context) -> StepResult:
    """Run one step, whatever happens: its result (a raised exception is a FAIL)."""
    t0 = time.monotonic()
    try:
        outcome = step.run(ctx)
    except Skip as e:
        outcome = Outcome(SKIP, _one_line(str(e)), {"reason": str(e)})
    except Terminated:
        outcome = Outcome(FAIL, "stopped by SIGTERM (its time cap ran out)", {"error": "SIGTERM"})
    except Exception as e:
        traceback.print_exc()
        error = f"{type(e).__name__}: {e}"
        outcome = Outcome(FAIL, "error: " + _one_line(error), {"error": error, "traceback": traceback.format_exc()})
    return StepResult(step.name, outcome.status, round(time.monotonic() - t0, 1), outcome.summary, outcome.details)


def no_result(name: str, exit_code: int, seconds: float, limit_s: float | None, reason: str | None) -> StepResult:
    """The entry of a step whose process ended without writing its result (killed at its cap, crashed) or that
    never ran: always a FAIL, the check did not happen."""
    if reason is None:
        cap = f"its {limit_s:.0f} s cap" if limit_s else "its cap"
        reason = {124: f"timed out: still running when {cap} ran out",
                  137: f"killed by SIGKILL (past {cap}, or out of memory)"}.get(
            exit_code, f"exited with code {exit_code} without writing its result (see its stderr)")
    return StepResult(name, FAIL, round(seconds, 1), reason, {"error": reason, "exit_code": exit_code})


def environment() -> dict[str, Any]:
    """What the report was made on."""
    import platform

    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "gpu": None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = f"{p.name} (sm{p.major}{p.minor}, {p.total_memory / 2 ** 30:.0f} GiB)"
    for dist in ("triton", "deep_gemm"):
        try:
            env[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env[dist] = None
    return env


def overall(results: Sequence[StepResult]) -> str:
    """FAIL if any step failed, else PASS if any passed, else SKIP (nothing could run here)."""
    statuses = {r.status for r in results}
    return FAIL if FAIL in statuses else PASS if PASS in statuses else SKIP


def write_report(path: Path, results: Sequence[StepResult]) -> dict[str, Any]:
    doc = {"version": REPORT_VERSION, "status": overall(results), "seconds": round(sum(r.seconds for r in results), 1),
           "environment": environment(), "steps": [jsonable(asdict(r)) for r in results]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)  # a reader sees the whole report or none
    return doc


def read_results(path: Path) -> list[StepResult]:
    """The step entries of a report; one FAIL entry (named after the file) if it cannot be read."""
    try:
        return [StepResult(**entry) for entry in json.loads(path.read_text())["steps"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [StepResult(path.stem, FAIL, 0.0, f"no readable result: {e}", {"error": str(e)})]


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moemesh.bench.gpu_check", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="steps:\n" + "\n".join(f"  {s.name:<27} {s.what}" for s in STEPS.values()))
    p.add_argument("steps", nargs="*", metavar="STEP", help="steps to run, in the order given")
    p.add_argument("--list", action="store_true", help="print the steps: name, cap in seconds, what it checks")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the report to FILE")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda: the check; cpu: the steps' logic on the CPU (what the tests run)")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="seconds each step may take (default: its cap); the step ends a few seconds before")
    p.add_argument("--work-dir", type=Path, default=None, metavar="DIR",
                   help="keep the steps' logs in DIR (default: a temporary folder, removed)")
    p.add_argument("--pid-dir", type=Path, default=None, metavar="DIR",
                   help="name the process groups a step starts in DIR (gpu_check.sh stops any left behind)")
    p.add_argument("--no-result", type=int, default=None, metavar="RC",
                   help="(gpu_check.sh) record STEP as a FAIL: its process ended with RC and wrote no result")
    p.add_argument("--reason", default=None, help="with --no-result: the reason to record instead")
    p.add_argument("--seconds", type=float, default=0.0, help="with --no-result: how long it ran")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="REPORT",
                   help="(gpu_check.sh) merge these step reports, in order, into --json and print the summary")
    return p


def _summary(doc: dict[str, Any], path: Path | None) -> str:
    counts = {s: sum(e["status"] == s for e in doc["steps"]) for s in (PASS, FAIL, SKIP)}
    where = f"; report {path}" if path else ""
    gpu = doc["environment"].get("gpu") or "no GPU"
    return (f"gpu_check: {doc['status']}: {counts[PASS]} PASS, {counts[FAIL]} FAIL, {counts[SKIP]} SKIP in "
            f"{doc['seconds']:.0f} s on {gpu}, torch {doc['environment']['torch']}{where}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        for s in STEPS.values():
            print(f"{s.name:<27} {s.cap_s:>4} s  {s.what}")
        return 0
    if args.merge:
        if args.json is None:
            parser.error("--merge needs --json FILE")
        results = [r for path in args.merge for r in read_results(path)]
        print(_summary(write_report(args.json, results), args.json), flush=True)
        return 1 if overall(results) == FAIL else 0
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown or not args.steps:
        parser.error(f"unknown step(s) {', '.join(unknown)}" if unknown else "name a step, or --list")
    if args.no_result is not None:
        results = [no_result(name, args.no_result, args.seconds, args.time_limit, args.reason) for name in args.steps]
        for r in results:
            print(r.line(), flush=True)
    else:
        signal.signal(signal.SIGTERM, _on_sigterm)  # children are stopped on the way out
        results = _run_steps(args)
    if args.json:
        write_report(args.json, results)
    return 1 if overall(results) == FAIL else 0


def _run_steps(args: argparse.Namespace) -> list[StepResult]:
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        for name in args.steps:
            step = STEPS[name]
            work = (args.work_dir or Path(tmp)) / name
            work.mkdir(parents=True, exist_ok=True)
            limit = args.time_limit or step.cap_s
            ctx = Context(args.device, time.monotonic() + limit - MARGIN_S, work, args.pid_dir)
            result = run_step(step, ctx)
            print(result.line(), flush=True)
            results.append(result)
    return results


if __name__ == "__main__":
    sys.exit(main())
