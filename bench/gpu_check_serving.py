"""Steps 1-3 of the GPU check (bench/gpu_check.py): the device-discipline tests on the real GPU, `moemesh generate`
on the GPU against the CPU, and the whole mesh on the GPU through the REST facade."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moemesh.bench.gpu_check_base import (
    MOEMESH,
    ROOT,
    Context,
    Outcome,
    Skip,
    judged,
    output_tail,
    run_bounded,
    step_device,
)

if TYPE_CHECKING:
    pass

# generate and mesh: greedy on the embedded tiny model, the same prompts and token budget everywhere.
PROMPTS = ("The mesh is", "Hello", "Once upon a time", "def main():")
MAX_TOKENS = 16
# A random tiny model's logits are nearly flat (top-2 gaps down to ~1e-4 in logprob), so bf16 rounding flips a
# greedy choice after a few tokens; a bug flips the very first ones.
BF16_PREFIX = 4

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
    step_device(ctx)
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
        details["output_tail"] = output_tail(out)
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
                raise RuntimeError(f"generate {label} exited with code {proc.returncode}: {output_tail(stderr)}")
            stdout = Path(f"{files[label]}.out").read_text()
            out[label] = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                # A child slow to go must not replace what is unwinding (a SIGTERM's Terminated; a full test run
                # once saw this wait time out there, and the step's report named the timeout, not the SIGTERM).
                with contextlib.suppress(subprocess.TimeoutExpired):
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
    step_device(ctx)
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
            return output_tail(self.log.read_bytes())
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
        raise RuntimeError(f"POST /v1/completions: HTTP {e.code}: {output_tail(e.read())}") from None
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
    step_device(ctx)
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


