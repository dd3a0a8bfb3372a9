"""Starting moemesh processes from a launcher (`moemesh up`, an EP group's launcher, benchmarks, tests) and
knowing when they serve.

- `die_with_parent`: a child's `preexec_fn`, so that no child outlives its launcher.
- `launch` / `ServiceProcess`: a child whose output a thread reads to its end (an unread pipe blocks the child
  once full), every line kept and readiness lines (`moemesh.telemetry.readiness`) parsed as they come;
  `start_service` runs `moemesh serve NAME ...` that way and waits for its "NAME listening on ADDR".
- `start_mesh` / `MeshProcess`: `moemesh up ...`, ready once it wrote its `--ready-file`.

Every wait has a deadline. A child that exits before it is ready, or misses the deadline, is stopped (SIGTERM,
then SIGKILL after a bound) and the error says so with the tail of its output.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from moemesh.telemetry.readiness import GRPC, LineReader, Ready, ServiceRecord, parse_line, read_ready_file

# The `moemesh` console script, run by this interpreter (so a test's or a venv's install is the one that runs).
ENTRY = (sys.executable, "-m", "moemesh.services.cli.main")
# Output lines quoted in an error about a child.
TAIL_LINES = 60


def die_with_parent() -> None:
    """In the child (a `preexec_fn`): get SIGTERM when the launcher dies, however it dies.

    Linux ties this to the thread that started the child: start children from a thread that outlives them.
    """
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


class ChildOutput:
    """A child's output pipe, read to its end by a thread: every line kept in `lines`, the readiness lines
    among them in `ready`; `sink`, if given, gets a copy of every line (a log file).

    A thread rather than select(): the pipe must be drained for as long as the child lives, whoever waits.
    """

    def __init__(self, stream: IO[bytes], name: str, sink: IO[str] | None = None) -> None:
        self.name = name
        self.lines: list[str] = []
        self.ready: list[Ready] = []
        self.ended = False
        self._stream = stream
        self._sink = sink
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._drain, name=f"output-{name}", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        reader = LineReader()
        try:
            while data := os.read(self._stream.fileno(), 1 << 16):
                self._add(reader.feed(data), parse=True)
        except OSError:
            pass
        finally:
            rest = reader.close()  # a line its writer never finished: kept, never taken as readiness
            self._add([rest] if rest else [], parse=False)
            self._stream.close()
            with self._changed:
                self.ended = True
                self._changed.notify_all()

    def _add(self, lines: list[str], parse: bool) -> None:
        if not lines:
            return
        if self._sink is not None:
            with contextlib.suppress(OSError, ValueError):  # a closed log must not stop the draining
                self._sink.write("".join(line + "\n" for line in lines))
                self._sink.flush()
        found = [r for r in map(parse_line, lines) if r is not None] if parse else []
        with self._changed:
            self.lines.extend(lines)
            self.ready.extend(found)
            self._changed.notify_all()

    def wait_ready(self, kind: str, deadline: float, service: str | None = None) -> Ready:
        """The first readiness line of `kind` (from `service`, if given). Raises TimeoutError once
        time.monotonic() passes `deadline`, EOFError when the output ends without one."""
        with self._changed:
            while True:
                for r in self.ready:
                    if r.kind == kind and (service is None or r.service == service):
                        return r
                if self.ended:
                    raise EOFError(f"{self.name}: output ended")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name}: deadline passed")
                self._changed.wait(min(left, 1.0))

    def found(self, service: str | None = None) -> list[Ready]:
        """The readiness lines read so far (from `service`, if given), in order."""
        with self._changed:
            return [r for r in self.ready if service is None or r.service == service]

    def join(self, timeout_s: float) -> None:
        """Wait (bounded) until the output ended: every line the child wrote is in `lines`."""
        self._thread.join(timeout_s)

    def tail(self, n: int = TAIL_LINES) -> str:
        """The last `n` lines, indented, after a newline; "" when there were none."""
        with self._changed:
            lines = self.lines[-n:]
        return "".join(f"\n    {line}" for line in lines)


class ServiceProcess:
    """A child of a launcher with its drained output (`output`); Popen's calls pass through to `proc`."""

    def __init__(self, name: str, proc: subprocess.Popen, output: ChildOutput, service: str | None = None) -> None:
        self.name = name
        self.proc = proc
        self.output = output
        self.service = service  # the name its readiness lines carry ("decode" for "decode-0-dp1"); None: any

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def terminate(self) -> None:
        self.proc.terminate()

    def kill(self) -> None:
        self.proc.kill()

    @property
    def address(self) -> str:
        """Its gRPC address once it printed "NAME listening on ADDR"; "" before."""
        return self.addresses().get(GRPC, "")

    def addresses(self) -> dict[str, str]:
        """kind (GRPC, HTTP, METRICS) -> address of the first readiness line of each kind printed so far."""
        out: dict[str, str] = {}
        for r in self.output.found(self.service):
            out.setdefault(r.kind, r.address)
        return out

    def wait_ready(self, kind: str = GRPC, *, deadline: float | None = None, timeout_s: float = 120) -> str:
        """The address of the child's first readiness line of `kind`, waiting until `deadline`
        (time.monotonic(); default now + `timeout_s`).

        Raises RuntimeError when the child exits (or closes its output) first, TimeoutError at the deadline,
        each with the tail of its output. It leaves the child running: `stop` is the caller's.
        """
        deadline = time.monotonic() + timeout_s if deadline is None else deadline
        what = {GRPC: "it was ready"}.get(kind, f"its {kind} readiness line")
        try:
            return self.output.wait_ready(kind, deadline, self.service).address
        except EOFError:
            try:
                code: int | str = self.proc.wait(5)
            except subprocess.TimeoutExpired:
                code = "none yet (its output closed)"
            raise RuntimeError(f"{self.name} exited with code {code} before {what}{self.output.tail()}") from None
        except TimeoutError:
            raise TimeoutError(f"{self.name} not ready in time ({what}){self.output.tail()}") from None

    def stop(self, timeout_s: float = 15) -> int:
        """SIGTERM, then SIGKILL if it is still there after `timeout_s`; its exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.output.join(2)
        return self.proc.returncode


def launch(cmd: Sequence[str], *, name: str, service: str | None = None, env: dict[str, str] | None = None,
           cwd: str | Path | None = None, stderr: Any = subprocess.STDOUT,
           sink: IO[str] | None = None) -> ServiceProcess:
    """Start `cmd` with its stdout read by a thread (and its stderr too, by default: `stderr` is Popen's).

    `env` is the child's whole environment (default: this process's), with PYTHONUNBUFFERED=1 unless it says
    otherwise, so that its logs reach the pipe as they are written. The child gets SIGTERM if this process dies.
    """
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, env=env,
                            cwd=cwd, preexec_fn=die_with_parent)
    assert proc.stdout is not None
    return ServiceProcess(name, proc, ChildOutput(proc.stdout, name, sink), service)


def start_service(service: str, args: Sequence[str] = (), *, name: str | None = None,
                  env: dict[str, str] | None = None, cwd: str | Path | None = None, stderr: Any = subprocess.STDOUT,
                  ready_timeout_s: float | None = 120) -> ServiceProcess:
    """`moemesh serve SERVICE ARGS` as a child (see `launch`), waited for until it prints "SERVICE listening on
    ADDR" (its address: `.addresses()[GRPC]`) unless `ready_timeout_s` is None.

    A child that exits first or is not ready in time is stopped, and RuntimeError / TimeoutError raised.
    """
    child = launch([*ENTRY, "serve", service, *args], name=name or service, service=service, env=env, cwd=cwd,
                   stderr=stderr)
    if ready_timeout_s is not None:
        try:
            child.wait_ready(GRPC, timeout_s=ready_timeout_s)
        except BaseException:
            child.stop()
            raise
    return child


# ---- a whole mesh: `moemesh up` --------------------------------------------------------------------------------


class MeshProcess:
    """`moemesh up` as a child: `services` (name -> record: pid, gRPC, REST and /metrics addresses) once ready."""

    def __init__(self, child: ServiceProcess, ready_dir: Path) -> None:
        self.child = child
        self.proc = child.proc
        self.output = child.output
        self.ready_file = ready_dir / "ready.json"
        self.services: dict[str, ServiceRecord] = {}
        self._ready_dir = ready_dir

    @property
    def gateway(self) -> str:
        """The gateway's gRPC address."""
        return self.services["gateway"].address

    def wait_ready(self, deadline: float) -> None:
        """Until `moemesh up` wrote its ready file; RuntimeError when it exits first, TimeoutError at
        `deadline` (time.monotonic()), each with the tail of its output."""
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                self.output.join(5)
                raise RuntimeError(f"moemesh up exited with code {self.proc.returncode} before it was ready"
                                   f"{self.output.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"moemesh up not ready in time{self.output.tail()}")
            time.sleep(0.1)
        self.services = {r.name: r for r in read_ready_file(self.ready_file)}
        if "gateway" not in self.services:
            raise RuntimeError(f"no gateway in the ready file of moemesh up: {sorted(self.services)}")

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM `moemesh up` (it stops its services), SIGKILL after `timeout_s`; its exit code."""
        try:
            return self.child.stop(timeout_s)
        finally:
            shutil.rmtree(self._ready_dir, ignore_errors=True)

    def alive_pids(self) -> list[int]:
        """The services' pids still running (zombies and pids now someone else's do not count)."""
        alive = []
        for pid in sorted({r.pid for r in self.services.values()}):
            try:
                os.kill(pid, 0)
            except (ProcessLookupError, PermissionError):
                continue
            if not _is_zombie(pid):
                alive.append(pid)
        return alive

    def kill_leftovers(self, grace_s: float = 5) -> list[int]:
        """After `stop`: the services still running `grace_s` later, killed (SIGKILL) here; [] after a clean stop."""
        deadline = time.monotonic() + grace_s
        alive = self.alive_pids()
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = self.alive_pids()
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return alive


def start_mesh(up_args: Sequence[str] = (), *, timeout_s: float = 240, env: dict[str, str] | None = None,
               cwd: str | Path | None = None, sink: IO[str] | None = None) -> MeshProcess:
    """`moemesh up --grpc-port 0 --http-port 0 UP_ARGS` (free ports unless UP_ARGS say otherwise) as a child,
    waited for until every service is ready and registered; stdout and stderr read together (`output`,
    a copy to `sink` if given).

    `moemesh up` gets `timeout_s` as its --ready-timeout (unless UP_ARGS set one), so that it names the late
    service; this side waits 30 s longer. On failure the child is stopped and RuntimeError or TimeoutError
    raised with the tail of its output.
    """
    ready_dir = Path(tempfile.mkdtemp(prefix="moemesh-up-"))
    cmd = [*ENTRY, "up", "--grpc-port", "0", "--http-port", "0", "--ready-timeout", f"{timeout_s:g}",
           "--ready-file", str(ready_dir / "ready.json"), *up_args]
    try:
        mesh = MeshProcess(launch(cmd, name="moemesh up", env=env, cwd=cwd, sink=sink), ready_dir)
    except BaseException:
        shutil.rmtree(ready_dir, ignore_errors=True)
        raise
    try:
        mesh.wait_ready(time.monotonic() + timeout_s + 30)
    except BaseException:
        mesh.stop()
        raise
    return mesh


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
