"""The parts every step of the GPU check shares (bench/gpu_check.py runs them): a step's context and outcome, its
report entry, the device it runs on, bounded child processes and the report's number formatting."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
MOEMESH = [sys.executable, "-m", "moemesh.services.cli.main"]
# The seconds a step keeps for itself inside its cap: writing its result before the wrapper's `timeout` fires.
MARGIN_S = 4.0
TAIL_CHARS = 3000  # of a child's output, kept in a FAIL's details


class Skip(Exception):
    """Raised by a step that cannot run here; the message says why."""


class Terminated(BaseException):
    """SIGTERM reached the step (bench/gpu_check.sh's cap ran out): unwind so that children are stopped."""


@dataclass
class Context:
    """What a step runs with."""

    device: str  # "cuda" for the check; "cpu" runs the step's logic on the CPU
    deadline: float  # time.monotonic() by which the step must be done: its waits are cut to fit
    work_dir: Path  # the step's logs and files
    pid_dir: Path | None = None  # where a step names the process groups it started (the wrapper kills leftovers)

    def left(self, keep: float = 0.0) -> float:
        """Seconds until the deadline, less `keep` (never below 1: a wait of 0 would not even look)."""
        return max(1.0, self.deadline - time.monotonic() - keep)


@dataclass
class Outcome:
    status: str
    summary: str  # the key figure, one line
    details: dict[str, Any] = field(default_factory=dict)


def judged(ok: bool, summary: str, details: dict[str, Any]) -> Outcome:
    return Outcome(PASS if ok else FAIL, summary, details)


@dataclass
class StepResult:
    """One entry of the report."""

    name: str
    status: str
    seconds: float
    summary: str
    details: dict[str, Any]

    def line(self) -> str:
        return f"{self.name:<27} {self.status:<4} {self.seconds:6.1f} s  {self.summary}"


# ---- helpers ------------------------------------------------------------------------------------------------------

def step_device(ctx: Context, gpu_only: bool = False) -> torch.device:
    """The step's torch device; Skip when it is CUDA and there is none, or, for `gpu_only` steps (kernels at
    DeepSeek-V3's sizes), when it is not CUDA."""
    import torch

    device = torch.device(ctx.device)
    if gpu_only and device.type != "cuda":
        raise Skip("times GPU kernels at DeepSeek-V3's sizes: GPU only (the tests run its comparison on the CPU at "
                   "small sizes)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Skip(f"no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda or 'not built in'}) "
                   "sees no GPU")
    return device


def output_tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-TAIL_CHARS:]


def run_bounded(cmd: Sequence[str], timeout_s: float, env: dict[str, str] | None = None) -> tuple[int | None, str]:
    """Run `cmd` from the repository root; (exit code, stdout + stderr). None: killed after `timeout_s`."""
    try:
        proc = subprocess.run(list(cmd), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:  # run() killed it
        return None, output_tail(e.stdout) + output_tail(e.stderr)
    return proc.returncode, proc.stdout + proc.stderr


def tflops(flop: float, ms: float) -> float:
    return flop / (ms * 1e-3) / 1e12 if ms > 0 else math.inf


def jsonable(obj: Any) -> Any:
    """`obj` for the report: floats rounded to 4 significant digits, inf and NaN (which JSON lacks) as None."""
    if isinstance(obj, float):
        return float(f"{obj:.4g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj

