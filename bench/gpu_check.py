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
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moemesh.bench.timing import mean_time_ms

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
REPORT_VERSION = 1
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
MOEMESH = [sys.executable, "-m", "moemesh.services.cli.main"]
# The seconds a step keeps for itself inside its cap: writing its result before the wrapper's `timeout` fires.
MARGIN_S = 4.0
TAIL_CHARS = 3000  # of a child's output, kept in a FAIL's details

# generate and mesh: greedy on the embedded tiny model, the same prompts and token budget everywhere.
PROMPTS = ("The mesh is", "Hello", "Once upon a time", "def main():")
MAX_TOKENS = 16
# A random tiny model's logits are nearly flat (top-2 gaps down to ~1e-4 in logprob), so bf16 rounding flips a
# greedy choice after a few tokens; a bug flips the very first ones.
BF16_PREFIX = 4

# DeepSeek-V3's routed expert: hidden D, intermediate I; 32 slots: one rank's share of 256 experts over EP 8.
V3_HIDDEN, V3_INTER, V3_SLOTS = 7168, 2048, 32
GROUPED_ROWS = 8192  # rows over the 32 slots in grouped-gemm: a prefill chunk's worth
DEEPGEMM_ROWS = 4096  # fewer for deepgemm: its float32 FP8 reference is slow
# grouped_mm against torch in bf16: max |diff| / max |ref|, a few bf16 units in the last place (as
# tests/unit/ep/test_grouped_mm_gemm.py): both sum in float32, only the order and h's rounding differ.
GROUPED_TOL = 2.0 ** -6
MATMUL_PEAK_N = 8192  # the square bf16 torch.mm that measures the GPU's matmul peak
EP_RANKS, LAYER_TOKENS = 8, 4096  # moe-layer-tflops: 4096 tokens on each of 8 ranks, this rank's 32 experts
DECODE_BATCH, DECODE_PROMPT, DECODE_TOKENS = 32, 64, 64  # v3-layer-decode


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

def _device(ctx: Context, gpu_only: bool = False) -> torch.device:
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


def _tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-TAIL_CHARS:]


def run_bounded(cmd: Sequence[str], timeout_s: float, env: dict[str, str] | None = None) -> tuple[int | None, str]:
    """Run `cmd` from the repository root; (exit code, stdout + stderr). None: killed after `timeout_s`."""
    try:
        proc = subprocess.run(list(cmd), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:  # run() killed it
        return None, _tail(e.stdout) + _tail(e.stderr)
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


# ---- step 1: the device-discipline tests on the real GPU ------------------------------------------------------------

DISCIPLINE_TESTS = "tests/unit/engine/test_device_discipline.py"
_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)")
_SKIPPED = re.compile(r"^SKIPPED \[\d+\] (.*)$", re.M)


def pytest_counts(output: str) -> dict[str, int]:
    """pytest -q's closing line ('6 passed, 3 skipped in 9.1s') as counts; 'error' and 'errors' both as errors."""
    lines = [ln for ln in output.strip().splitlines() if _COUNTS.search(ln) and " in " in ln]
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    for n, word in _COUNTS.findall(lines[-1] if lines else ""):
        key = "errors" if word.startswith("error") else word
        counts[key] = counts.get(key, 0) + int(n)
    return counts


def step_fake_device_tests(ctx: Context) -> Outcome:
    """tests/unit/engine/test_device_discipline.py with MOEMESH_TEST_REAL_CUDA=1 (tests/fake_cuda.py's contexts do
    nothing, the engine runs on the real GPU). PASS: pytest exits 0 with at least one test passed; the tests that
    only make sense on the simulated device skip, with their reasons in the details."""
    if ctx.device != "cuda":
        raise Skip("runs the tests on a real GPU only (on the CPU they run in the normal test suite)")
    _device(ctx)
    if not (ROOT / DISCIPLINE_TESTS).is_file():
        raise RuntimeError(f"{DISCIPLINE_TESTS} is not in {ROOT}: run from a checkout (`pip install -e .`)")
    env = {**os.environ, "MOEMESH_TEST_REAL_CUDA": "1"}
    # No cache folder: the check leaves the checkout as it found it.
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", DISCIPLINE_TESTS]
    rc, out = run_bounded(cmd, ctx.left(), env)
    counts = pytest_counts(out)
    details: dict[str, Any] = {"command": " ".join(cmd[1:]), "exit_code": rc, **counts,
                               "skip_reasons": _SKIPPED.findall(out)}
    ok = rc == 0 and counts["passed"] > 0 and counts["failed"] == counts["errors"] == 0
    if not ok:
        details["output_tail"] = _tail(out)
    state = "timed out" if rc is None else f"exit {rc}"
    return judged(ok, f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
                      f"{counts['skipped']} skipped (simulated device only) on real CUDA ({state})", details)


# ---- step 2: moemesh generate on the GPU against the CPU ------------------------------------------------------------

def generate_command(device: str, dtype: str, prompts: Sequence[str] = PROMPTS,
                     max_tokens: int = MAX_TOKENS) -> list[str]:
    """`moemesh generate`, greedy on the embedded tiny model, with the top-2 logprobs of every step (the margin
    at a divergence tells a near tie from a bug)."""
    return [*MOEMESH, "generate", "--json", "--device", device, "--dtype", dtype, "--temperature", "0",
            "--max-tokens", str(max_tokens), "--ignore-eos", "--logprobs", "2", *prompts]


def run_generations(runs: dict[str, list[str]], timeout_s: float, work_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Run every command of `runs` at once (the CPU reference while the GPU ones start), their output in files of
    `work_dir` (pipes read one after the other could fill and stall a child); label -> one JSON object per prompt.
    RuntimeError naming the run that failed or outlived `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    files = {label: work_dir / f"generate-{label.replace(' ', '-')}" for label in runs}
    procs = {}
    try:
        for label, cmd in runs.items():
            with open(f"{files[label]}.out", "wb") as out_f, open(f"{files[label]}.err", "wb") as err_f:
                procs[label] = subprocess.Popen(cmd, cwd=ROOT, stdout=out_f, stderr=err_f)
        out: dict[str, list[dict[str, Any]]] = {}
        for label, proc in procs.items():
            try:
                proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"generate {label} did not finish within {timeout_s:.0f} s") from None
            if proc.returncode != 0:
                stderr = Path(f"{files[label]}.err").read_bytes()
                raise RuntimeError(f"generate {label} exited with code {proc.returncode}: {_tail(stderr)}")
            stdout = Path(f"{files[label]}.out").read_text()
            out[label] = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return out


def first_divergence(ref: Sequence[Any], got: Sequence[Any]) -> int | None:
    """The first position where `got` differs from `ref` (a shorter or longer one differs where it ends), None if
    they are equal."""
    for i, (a, b) in enumerate(zip(ref, got, strict=False)):
        if a != b:
            return i
    return None if len(ref) == len(got) else min(len(ref), len(got))


def top2_margin(completion: dict[str, Any], position: int) -> float | None:
    """The logprob gap between the two likeliest tokens at `position` of a `generate --json --logprobs 2` object."""
    steps = completion.get("top_logprobs") or []
    if position >= len(steps) or len(steps[position]) < 2:
        return None
    return steps[position][0]["logprob"] - steps[position][1]["logprob"]


def compare_generations(ref: list[dict[str, Any]], got: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per prompt: where `got`'s tokens first differ from `ref`'s (None: identical), the tokens there, and the
    reference's top-2 margin there."""
    if len(ref) != len(got):
        raise RuntimeError(f"{len(got)} completions against {len(ref)} in the reference")
    rows = []
    for r, g in zip(ref, got, strict=True):
        at = first_divergence(r["token_ids"], g["token_ids"])
        row: dict[str, Any] = {"prompt": r["prompt"], "tokens": len(r["token_ids"]), "first_divergence": at}
        if at is not None:
            row.update(ref_token=r["token_ids"][at:at + 1], got_token=g["token_ids"][at:at + 1],
                       ref_top2_margin=top2_margin(r, at))
        rows.append(row)
    return rows


def judge_generate(f32: list[dict[str, Any]], bf16: list[dict[str, Any]], device: str) -> Outcome:
    """PASS: float32 on `device` gives the CPU float32 tokens exactly, and bf16 on `device` matches them on at least
    the first BF16_PREFIX tokens of every prompt."""
    f32_same = sum(r["first_divergence"] is None for r in f32)
    bf16_same = sum(r["first_divergence"] is None for r in bf16)
    bf16_ok = all(r["first_divergence"] is None or r["first_divergence"] >= BF16_PREFIX for r in bf16)
    divergences = [r["first_divergence"] for r in bf16]
    summary = (f"float32 {device} == cpu float32 on {f32_same}/{len(f32)} prompts x {MAX_TOKENS} tokens; bfloat16: "
               f"{bf16_same}/{len(bf16)} identical, first divergence {divergences} (rule: float32 identical, "
               f"bfloat16's first {BF16_PREFIX} tokens of every prompt match)")
    return judged(f32_same == len(f32) and bf16_ok, summary,
                  {"rule": f"float32 on {device} identical to cpu float32; bfloat16 on {device} equal to cpu float32 "
                           f"on the first {BF16_PREFIX} tokens of every prompt",
                   "prompts": list(PROMPTS), "max_tokens": MAX_TOKENS, "float32": f32, "bfloat16": bf16})


def step_generate(ctx: Context) -> Outcome:
    """`moemesh generate --device cuda` on the embedded tiny model, greedy, against `--device cpu` float32 (see
    `judge_generate` for the rule)."""
    _device(ctx)
    from moemesh.model.default import default_model_dir

    default_model_dir()  # written once here, not raced by the three runs below
    runs = {"cpu float32": generate_command("cpu", "float32"),
            f"{ctx.device} float32": generate_command(ctx.device, "float32"),
            f"{ctx.device} bfloat16": generate_command(ctx.device, "bfloat16")}
    out = run_generations(runs, ctx.left(), ctx.work_dir)
    ref = out["cpu float32"]
    return judge_generate(compare_generations(ref, out[f"{ctx.device} float32"]),
                          compare_generations(ref, out[f"{ctx.device} bfloat16"]), ctx.device)


# ---- step 3: the whole mesh on the GPU, through the REST facade ----------------------------------------------------

def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 now (held together while picked, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class MeshProcess:
    """`moemesh up` in its own session, so that its whole process group can be stopped, by us or by the wrapper
    (through `pid_dir`) if we are killed first."""

    def __init__(self, args: list[str], log: Path, pid_dir: Path | None) -> None:
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen([*MOEMESH, "up", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.pid_file = pid_dir / f"{self.proc.pid}.pgid" if pid_dir else None
        if self.pid_file:
            self.pid_file.parent.mkdir(parents=True, exist_ok=True)
            self.pid_file.write_text(f"{self.proc.pid}\n")

    def wait_ready(self, ready_file: Path, deadline: float) -> str:
        """The gateway's REST address once `moemesh up` wrote its ready file. RuntimeError if it exits first or
        is not ready by `deadline`."""
        from moemesh.telemetry.readiness import read_ready_file

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moemesh up exited with code {self.proc.returncode} before it was ready: "
                                   f"{self.log_tail()}")
            if ready_file.is_file():
                gateway = next(r for r in read_ready_file(ready_file) if r.name == "gateway")
                return gateway.http_address
            time.sleep(0.5)
        raise RuntimeError(f"moemesh up was not ready in time: {self.log_tail()}")

    def stop(self, term_wait_s: float = 20, kill_wait_s: float = 5) -> str:
        """SIGTERM to the group, SIGKILL if anything is left after `term_wait_s`; how it went, in words."""
        t0 = time.monotonic()
        how = "SIGTERM"
        self._signal(signal.SIGTERM)
        if not self._wait_gone(term_wait_s):
            how = f"SIGKILL (still running {term_wait_s:.0f} s after SIGTERM)"
            self._signal(signal.SIGKILL)
            if not self._wait_gone(kill_wait_s):
                return f"not stopped: process group {self.proc.pid} survived SIGKILL"
        if self.pid_file:
            self.pid_file.unlink(missing_ok=True)
        return f"{how}, {time.monotonic() - t0:.1f} s"

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _wait_gone(self, timeout_s: float) -> bool:
        """Until the leader is reaped and no process of the group is left, at most `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                try:
                    os.killpg(self.proc.pid, 0)
                except ProcessLookupError:
                    return True
            time.sleep(0.2)
        return False

    def log_tail(self) -> str:
        try:
            return _tail(self.log.read_bytes())
        except OSError as e:
            return f"(no log: {e})"


def post_completions(http_address: str, prompts: Sequence[str], max_tokens: int, timeout_s: float
                     ) -> list[dict[str, Any]]:
    """POST /v1/completions, greedy, every prompt in one batch, with each token's text (logprobs 0); the choices
    in prompt order. RuntimeError with the body of an HTTP error."""
    body = {"prompt": list(prompts), "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    req = urllib.request.Request(f"http://{http_address}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            doc = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST /v1/completions: HTTP {e.code}: {_tail(e.read())}") from None
    return sorted(doc["choices"], key=lambda c: c["index"])


def compare_rest(ref: list[dict[str, Any]], choices: list[dict[str, Any]], token_text: Callable[[int], str]
                 ) -> list[dict[str, Any]]:
    """Per prompt: where the REST choice's tokens (their texts, all the facade returns of them) first differ from
    the texts of the reference's token ids (None: identical), and whether the whole texts are equal."""
    if len(ref) != len(choices):
        raise RuntimeError(f"{len(choices)} choices for {len(ref)} prompts")
    rows = []
    for r, c in zip(ref, choices, strict=True):
        want = [token_text(t) for t in r["token_ids"]]
        got = list((c.get("logprobs") or {}).get("tokens") or [])
        at = first_divergence(want, got)
        row: dict[str, Any] = {"prompt": r["prompt"], "tokens": len(want), "first_divergence": at,
                               "text_equal": c["text"] == r["text"]}
        if at is not None:
            row.update(ref_token=want[at:at + 1], got_token=got[at:at + 1])
        rows.append(row)
    return rows


def step_mesh(ctx: Context) -> Outcome:
    """`moemesh up --device cuda --prefill 1 --decode 1` (float32 workers), then the prompts through REST
    /v1/completions against CPU float32 `moemesh generate`. PASS: every prompt's tokens (their texts) and whole text
    equal the CPU's, and the mesh's process group is gone within 20 s of SIGTERM."""
    _device(ctx)
    from moemesh.model.default import default_model_dir
    from moemesh.model.tokenizer import Tokenizer

    model_dir = default_model_dir()  # written before the workers start, not raced by them
    http_port, grpc_port = free_ports(2)
    ready = ctx.work_dir / "mesh-ready.json"
    ready.unlink(missing_ok=True)
    ready_s = ctx.left(keep=40)  # the rest: the request and the stop
    args = ["--device", ctx.device, "--prefill", "1", "--decode", "1", "--http-port", str(http_port),
            "--grpc-port", str(grpc_port), "--ready-file", str(ready), "--ready-timeout", str(int(ready_s)),
            "--", "--dtype", "float32"]
    t0 = time.monotonic()
    mesh = MeshProcess(args, ctx.work_dir / "mesh.log", ctx.pid_dir)
    try:
        # The CPU reference runs while the mesh starts.
        ref = run_generations({"cpu float32": generate_command("cpu", "float32")}, ready_s, ctx.work_dir)
        ref = ref["cpu float32"]
        address = mesh.wait_ready(ready, t0 + ready_s)
        up_s = time.monotonic() - t0
        choices = post_completions(address, PROMPTS, MAX_TOKENS, ctx.left(keep=30))
    finally:
        stopped = mesh.stop()
    tokenizer = Tokenizer.from_dir(model_dir)
    rows = compare_rest(ref, choices, lambda t: tokenizer.decode([t], skip_special_tokens=False))
    same = sum(r["first_divergence"] is None and r["text_equal"] for r in rows)
    clean = stopped.startswith("SIGTERM")
    return judged(same == len(rows) and clean,
                  f"REST on {ctx.device} == cpu generate on {same}/{len(rows)} prompts x {MAX_TOKENS} tokens; up in "
                  f"{up_s:.0f} s; stopped by {stopped} (rule: all identical, stopped by SIGTERM)",
                  {"prompts": rows, "up_seconds": round(up_s, 1), "stop": stopped,
                   **({} if same == len(rows) and clean else {"log_tail": mesh.log_tail()})})


# ---- step 4: torch._grouped_mm against plain torch, bf16 at V3 expert dims -----------------------------------------

def skewed_counts(slots: int, rows: int, seed: int = 0) -> list[int]:
    """`rows` split over `slots` as routed traffic is: Zipf-like shares in a seeded order, one slot empty, and
    counts of any size (so the kernels' ragged edges run)."""
    shares = [1.0 / (k + 1) ** 0.8 for k in range(slots - 1)] + [0.0]
    random.Random(seed).shuffle(shares)
    counts = [int(rows * s / sum(shares)) for s in shares]
    counts[counts.index(max(counts))] += rows - sum(counts)
    return counts


def expert_weights(slots: int, hidden: int, inter: int, device: torch.device, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [S, 2I, D], w2 [S, D, I] bf16, scaled by 1/sqrt(fan-in) so activations stay O(1)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.randn(slots, 2 * inter, hidden, device=device, dtype=torch.bfloat16, generator=gen)
    w2 = torch.randn(slots, hidden, inter, device=device, dtype=torch.bfloat16, generator=gen)
    return w13.mul_(hidden ** -0.5), w2.mul_(inter ** -0.5)


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float32."""
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30)).item()


def grouped_gemm_case(device: torch.device, hidden: int, inter: int, counts: list[int], seed: int = 0,
                      iters: int = 10) -> dict[str, Any]:
    """TorchGroupedMmGemm against TorchGroupedGemm in bf16 on rows grouped by `counts`: max error relative to the
    output's scale in both layouts, and each backend's contiguous time and TFLOP/s."""
    import torch

    from moemesh.bench.ep_hopper_moe import masked_of
    from moemesh.ep.experts import TorchGroupedGemm
    from moemesh.ep.grouped_mm import TorchGroupedMmGemm

    w13, w2 = expert_weights(len(counts), hidden, inter, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    xs = torch.randn(sum(counts), hidden, device=device, dtype=torch.bfloat16, generator=gen)
    plain, grouped = TorchGroupedGemm(), TorchGroupedMmGemm()
    weights = grouped.prepare(w13, w2)
    xm, counts_t, valid = masked_of(xs, counts)
    errors = {"contiguous": max_rel_error(grouped.contiguous(xs, counts, weights),
                                          plain.contiguous(xs, counts, (w13, w2))),
              "masked": max_rel_error(grouped.masked(xm, counts_t, weights)[valid],
                                      plain.masked(xm, counts_t, (w13, w2))[valid])}
    flop = 2 * sum(counts) * 3 * hidden * inter
    ms = {"grouped_mm": mean_time_ms(lambda: grouped.contiguous(xs, counts, weights), device, iters=iters),
          "torch": mean_time_ms(lambda: plain.contiguous(xs, counts, (w13, w2)), device, iters=iters)}
    return {"rows": sum(counts), "slots": len(counts), "hidden": hidden, "inter": inter, "counts": counts,
            "max_rel_error": errors, "tolerance": GROUPED_TOL, "ms": ms,
            "tflops": {k: tflops(flop, v) for k, v in ms.items()}}


def step_grouped_gemm(ctx: Context) -> Outcome:
    """TorchGroupedMmGemm (torch._grouped_mm) against TorchGroupedGemm in bf16 at DeepSeek-V3's expert dims, 32 slots,
    skewed counts. PASS: max |diff| <= 2^-6 x max |output| in both layouts; the TFLOP/s are measurements."""
    import torch

    from moemesh.ep.grouped_mm import unsupported

    device = _device(ctx, gpu_only=True)
    why = unsupported(device, torch.bfloat16, V3_HIDDEN, V3_INTER)
    if why:
        raise Skip(f"torch._grouped_mm {why}")
    r = grouped_gemm_case(device, V3_HIDDEN, V3_INTER, skewed_counts(V3_SLOTS, GROUPED_ROWS))
    err = max(e if math.isfinite(e) else math.inf for e in r["max_rel_error"].values())  # NaN: a FAIL
    return judged(err <= GROUPED_TOL,
                  f"max err {err:.1e} of the output's scale (tol {GROUPED_TOL:.1e}); grouped_mm "
                  f"{r['tflops']['grouped_mm']:.0f} TFLOP/s, torch {r['tflops']['torch']:.0f} TFLOP/s "
                  f"({r['rows']} rows over {V3_SLOTS} slots, D={V3_HIDDEN}, I={V3_INTER}, bf16)", r)


# ---- step 5: DeepGEMM's FP8 grouped GEMMs ----------------------------------------------------------------------------

def deepgemm_case(gemm: Any, device: torch.device, hidden: int, inter: int, counts: list[int], seed: int = 0
                  ) -> dict[str, Any]:
    """A DeepGemmGroupedGemm in both layouts against the FP8 reference (the same quantized operands multiplied in
    float32 by plain torch) and against TorchGroupedGemm in bf16; normwise and max relative errors."""
    import torch

    from moemesh.bench.ep_hopper_moe import TOL_VS_BF16, TOL_VS_FP8_REFERENCE, masked_of, rel_errors
    from moemesh.ep.deepgemm import DeepGemmGroupedGemm
    from moemesh.ep.experts import TorchGroupedGemm

    w13, w2 = expert_weights(len(counts), hidden, inter, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    xs = torch.randn(sum(counts), hidden, device=device, dtype=torch.bfloat16, generator=gen)
    weights = gemm.prepare(w13, w2)
    fp8_ref, bf16 = DeepGemmGroupedGemm.emulated(pow2_scales=gemm.pow2_scales), TorchGroupedGemm()
    xm, counts_t, valid = masked_of(xs, counts)
    layouts: dict[str, Callable[[Any, Any], torch.Tensor]] = {
        "contiguous": lambda g, w: g.contiguous(xs, counts, w),
        "masked": lambda g, w: g.masked(xm, counts_t, w)[valid],
    }
    out: dict[str, Any] = {"rows": sum(counts), "slots": len(counts), "hidden": hidden, "inter": inter,
                           "tolerance": {"vs_fp8_reference": TOL_VS_FP8_REFERENCE, "vs_bf16": TOL_VS_BF16}}
    ok = True
    for name, run in layouts.items():
        got = run(gemm, weights)
        vs_fp8 = rel_errors(got, run(fp8_ref, weights))  # the same quantized weights: only the kernels differ
        vs_bf16 = rel_errors(got, run(bf16, (w13, w2)))
        ok &= vs_fp8[0] < TOL_VS_FP8_REFERENCE and vs_bf16[0] < TOL_VS_BF16
        out[name] = {"vs_fp8_reference": {"norm": vs_fp8[0], "max": vs_fp8[1]},
                     "vs_bf16": {"norm": vs_bf16[0], "max": vs_bf16[1]}}
    out["ok"] = ok
    # After the checks: DeepGEMM compiles each shape on its first call, outside the timing.
    ms = mean_time_ms(lambda: gemm.contiguous(xs, counts, weights), device)
    out.update(ms=ms, tflops=tflops(2 * sum(counts) * 3 * hidden * inter, ms))
    return out


def step_deepgemm(ctx: Context) -> Outcome:
    """DeepGemmGroupedGemm, contiguous and masked, at V3 expert dims over 32 slots against the FP8 reference and
    TorchGroupedGemm bf16. PASS: normwise relative error < 3e-2 against the FP8 reference and < 0.1 against bf16
    (FP8's own error; the CPU tests' and bench/ep_hopper_moe.py's tolerances), both layouts."""
    try:
        importlib.import_module("deep_gemm")
    except Exception as e:  # a broken build raises more than ImportError
        raise Skip(f"deep_gemm is not importable: {type(e).__name__}: {e}") from None
    device = _device(ctx, gpu_only=True)
    from moemesh.ep.deepgemm import DeepGemmGroupedGemm

    gemm = DeepGemmGroupedGemm()  # deep_gemm imports but cannot serve here: a FAIL, with its reason
    r = deepgemm_case(gemm, device, V3_HIDDEN, V3_INTER, skewed_counts(V3_SLOTS, DEEPGEMM_ROWS))
    parts = [f"{k} {r[k]['vs_fp8_reference']['norm']:.1e} vs fp8 ref, {r[k]['vs_bf16']['norm']:.1e} vs bf16"
             for k in ("contiguous", "masked")]
    return judged(r["ok"], f"normwise rel err: {'; '.join(parts)} (tol {r['tolerance']['vs_fp8_reference']:.0e}, "
                           f"{r['tolerance']['vs_bf16']:.0e}); contiguous end to end {r['tflops']:.0f} TFLOP/s "
                           f"({r['rows']} rows over {V3_SLOTS} slots, D={V3_HIDDEN}, I={V3_INTER}, fp8)", r)


# ---- step 6: one MoE layer's routed experts against the GPU's matmul peak -------------------------------------------

def layer_counts(device: torch.device, local_experts: int, ranks: int, tokens_per_rank: int, shape: Any = None,
                 seed: int = 0) -> list[int]:
    """The rows EP rank 0 receives for its `local_experts` experts when each of `ranks` ranks routes
    `tokens_per_rank` tokens as DeepSeek-V3 routes (bench/ep_hopper_moe.py's `route`: sigmoid scores, top-4 of 8
    groups, top-8 experts, a per-expert bias for an uneven load)."""
    import torch

    from moemesh.bench.ep_hopper_moe import DEEPSEEK_V3, route

    shape = shape or DEEPSEEK_V3
    ids = route(shape, ranks * tokens_per_rank, device, torch.Generator(device=device).manual_seed(seed))
    return torch.bincount(ids.reshape(-1), minlength=shape.experts)[:local_experts].tolist()


def matmul_peak_tflops(device: torch.device, n: int = MATMUL_PEAK_N, iters: int = 20) -> float:
    """TFLOP/s of a square bf16 torch.mm of side `n`: this GPU's practical matmul peak, measured, not from a
    datasheet."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    return tflops(2 * n ** 3, mean_time_ms(lambda: torch.mm(a, b, out=out), device, warmup=3, iters=iters))


def moe_layer_case(device: torch.device, counts: list[int], hidden: int, inter: int, peak_n: int = MATMUL_PEAK_N,
                   iters: int = 10) -> dict[str, Any]:
    """The routed experts of one layer on one rank (rows grouped by `counts`) through every bf16 grouped GEMM that
    runs here, timed, and the best as a fraction of the measured matmul peak."""
    import torch

    from moemesh.ep.experts import TorchGroupedGemm
    from moemesh.ep.grouped_mm import TorchGroupedMmGemm, unsupported

    w13, w2 = expert_weights(len(counts), hidden, inter, device)
    xs = torch.randn(sum(counts), hidden, device=device, dtype=torch.bfloat16,
                     generator=torch.Generator(device=device).manual_seed(1))
    backends: dict[str, tuple[Any, Any]] = {"torch": (TorchGroupedGemm(), (w13, w2))}
    if unsupported(device, torch.bfloat16, hidden, inter) is None:
        grouped = TorchGroupedMmGemm()
        backends["grouped_mm"] = (grouped, grouped.prepare(w13, w2))
    flop = 2 * sum(counts) * 3 * hidden * inter
    rates, finite = {}, True
    for name, (gemm, weights) in backends.items():
        finite &= bool(torch.isfinite(gemm.contiguous(xs, counts, weights)).all())
        rates[name] = tflops(flop, mean_time_ms(lambda g=gemm, w=weights: g.contiguous(xs, counts, w), device,
                                           iters=iters))
    peak = matmul_peak_tflops(device, peak_n)
    best = max(rates, key=rates.__getitem__)
    return {"rows": sum(counts), "slots": len(counts), "max_rows": max(counts), "min_rows": min(counts),
            "hidden": hidden, "inter": inter, "tflop": flop / 1e12, "tflops": rates, "best": best,
            "matmul_peak_tflops": peak, "matmul_peak_n": peak_n, "fraction_of_peak": rates[best] / peak,
            "finite": finite}


def step_moe_layer_tflops(ctx: Context) -> Outcome:
    """One DeepSeek-V3 MoE layer's routed-expert GEMMs on one rank of EP 8 (32 local experts; 4096 tokens on each
    rank, top-8 of 256 experts as V3 routes), bf16, in TFLOP/s against a bf16 torch.mm of side 8192 timed with CUDA
    events. PASS: the outputs are finite and the fraction of peak is in (0, 1.2] (above: the peak is mismeasured)."""
    device = _device(ctx, gpu_only=True)
    r = moe_layer_case(device, layer_counts(device, V3_SLOTS, EP_RANKS, LAYER_TOKENS), V3_HIDDEN, V3_INTER)
    frac = r["fraction_of_peak"]
    rates = [f"{k} {v:.0f}" for k, v in r["tflops"].items()]
    return judged(r["finite"] and 0 < frac <= 1.2,
                  f"{frac:.2f} of peak: {r['best']} {r['tflops'][r['best']]:.0f} TFLOP/s against bf16 mm "
                  f"{r['matmul_peak_tflops']:.0f} TFLOP/s ({', '.join(rates)}; {r['rows']} rows over {V3_SLOTS} "
                  f"experts, {r['min_rows']} to {r['max_rows']} each; rule: finite, fraction in (0, 1.2])", r)


# ---- step 7: decode speed of a v3-layer checkpoint ------------------------------------------------------------------

def decode_rate(model_dir: Path, device: str, batch: int = DECODE_BATCH, prompt_len: int = DECODE_PROMPT,
                new_tokens: int = DECODE_TOKENS) -> dict[str, Any]:
    """Greedy decode tokens per second of `batch` random prompts in the engine: the time of `new_tokens` tokens
    less the time of one (the prefill and the first token), over the `new_tokens - 1` decode steps."""
    import torch

    from moemesh.engine.engine import Engine, EngineConfig
    from moemesh.engine.sampling_params import SamplingParams
    from moemesh.model.config import ModelConfig

    vocab = ModelConfig.from_dir(model_dir).vocab_size
    # Prefix caching off: the second run must not find the first one's prompts cached.
    engine = Engine(EngineConfig(model=str(model_dir), device=device, enable_prefix_caching=False,
                                 max_num_seqs=max(64, batch), max_num_batched_tokens=max(2048, batch * prompt_len)))
    # Ids from 8 up: the special tokens live below, and EOS would end a run early.
    prompts = torch.randint(8, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).tolist()

    def timed(n: int) -> tuple[float, list[Any]]:
        t0 = time.perf_counter()
        outs = engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        return time.perf_counter() - t0, outs  # generate returns token lists: the device is done

    engine.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))  # warm-up
    first_s, _ = timed(1)
    all_s, outs = timed(new_tokens)
    decode_s = max(all_s - first_s, 1e-9)
    return {"model": str(model_dir), "device": device, "dtype": str(next(engine.model.parameters()).dtype),
            "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "complete": all(len(o.token_ids) == new_tokens for o in outs), "prefill_and_first_token_s": first_s,
            "decode_step_ms": decode_s / (new_tokens - 1) * 1e3, "decode_tok_s": batch * (new_tokens - 1) / decode_s}


def _no_v3_layer_dir() -> str:
    from moemesh.model.tiny import PRESETS

    how = ("write one with `moemesh make-tiny DIR --preset v3-layer --dtype bfloat16`" if "v3-layer" in PRESETS
           else "the `moemesh make-tiny --preset v3-layer` preset does not exist yet")
    return f"V3_LAYER_DIR is not set: point it at a v3-layer checkpoint folder ({how})"


def step_v3_layer_decode(ctx: Context) -> Outcome:
    """Decode tok/s of the v3-layer checkpoint in $V3_LAYER_DIR on one GPU, greedy, batch 32, 64-token prompts,
    64 new tokens, the checkpoint's dtype. SKIP without V3_LAYER_DIR. PASS: every request got its 64 tokens (the
    rate is a measurement)."""
    folder = os.environ.get("V3_LAYER_DIR")
    if not folder:
        raise Skip(_no_v3_layer_dir())
    if not (Path(folder) / "config.json").is_file():
        raise RuntimeError(f"V3_LAYER_DIR={folder} has no config.json")
    _device(ctx)
    r = decode_rate(Path(folder), ctx.device)
    return judged(r["complete"], f"{r['decode_tok_s']:.0f} tok/s decode ({r['decode_step_ms']:.2f} ms per step at "
                                 f"batch {r['batch']}, {r['dtype']}, {Path(folder).name}; rule: every request "
                                 f"got its {r['new_tokens']} tokens)", r)


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
