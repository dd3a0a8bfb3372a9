"""`moemesh up --detach` and `moemesh down`: the mesh in the background, found again through a pid file.

`up --detach` starts `moemesh up` again as a child in a session of its own (no terminal: Ctrl-C and a closed
terminal leave it alone), its output and its services' logs going to a log file, and returns once the mesh is
ready (its ready file written) with where it listens. The background `up` writes the pid file itself (so that a
mesh that stops on its own removes it) and leads a process group holding every service: `moemesh down` signals
that group, so that nothing is left behind even if `up` itself dies first.

Files: the pid file (default `<cache>/up.pid`, `MOEMESH_CACHE_DIR` moves the cache) holds one pid, as `kill
$(cat up.pid)` expects; the log file and the ready file sit next to it (`up.log`, `up.ready.json`) unless told
otherwise.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from moemesh.telemetry.readiness import ServiceRecord, read_ready_file

# How long `up --detach` waits past the mesh's own --ready-timeout (which the background `up` enforces itself,
# naming the late service in the log) before it gives up on it.
READY_MARGIN_S = 30.0
# After SIGKILL: how long the processes get to vanish (the kernel's part, not theirs).
KILL_GRACE_S = 5.0
LOG_TAIL_LINES = 30


def default_pid_file() -> Path:
    from moemesh.model.default import cache_root

    return cache_root() / "up.pid"


def beside(pid_file: Path, suffix: str) -> Path:
    """The file next to the pid file with its suffix replaced: `up.pid` -> `up.log`, `up.ready.json`."""
    return pid_file.with_suffix(suffix) if pid_file.suffix else pid_file.with_name(pid_file.name + suffix)


# ---- the pid file ----------------------------------------------------------------------------------------------


def read_pid(path: Path) -> int | None:
    """The pid in `path`; None when there is no such file or it holds no pid."""
    try:
        text = path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    return int(text) if text.isdigit() else None


def write_pid_file(path: Path, pid: int) -> None:
    """Create `path` holding `pid`; FileExistsError when it exists (another `up` got there first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(f"{pid}\n")


def remove_pid_file(path: Path, pid: int) -> None:
    """Remove `path` if it still names `pid` (a later mesh's file is not ours to remove)."""
    if read_pid(path) == pid:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, pgrp, ...); None when gone or not Linux."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: nothing may reap it where PID 1 does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = _proc_stat(pid)
    return stat is None or stat[0] != "Z"


def is_moemesh_up(pid: int) -> bool:
    """Whether `pid` runs `moemesh up` (a pid file can outlive its process and the pid be reused by another):
    by its command line where /proc tells it, else by its being alive."""
    if not alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return True  # no /proc: nothing more to check
    entry = any(a == "moemesh.services.cli.main" or Path(a).name == "moemesh" for a in argv)
    return entry and "up" in argv


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: the group as the kernel sees it, zombies included
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and len(stat) > 2 and stat[2] == str(pgid) and stat[0] != "Z":
                members.append(int(entry.name))
    return members


# ---- up --detach -----------------------------------------------------------------------------------------------


def start(argv: Sequence[str], pid_file: Path, log_file: Path, ready_file: Path,
          ready_timeout_s: float) -> tuple[int, list[ServiceRecord]] | None:
    """Run `moemesh ARGV` (an `up` command line, --detach in it) in the background and wait until it is ready.

    Returns the background `up`'s pid (which it wrote to `pid_file`) and its services, or None when it failed:
    then it was stopped and the error printed with the tail of its log. `ready_file`: where the background `up`
    writes its ready file (ARGV's own --ready-file if it has one)."""
    from moemesh.service.launch import ENTRY

    pid = read_pid(pid_file)
    if pid is not None and is_moemesh_up(pid):
        print(f"moemesh up: a mesh is already running (pid {pid}, pid file {pid_file}); "
              f"`{down_command(pid_file)}` stops it", file=sys.stderr)
        return None
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()  # a stale one: its mesh is gone
    with contextlib.suppress(FileNotFoundError):
        ready_file.unlink()  # a ready file left by a mesh that was killed would read as "ready" at once
    log_file.parent.mkdir(parents=True, exist_ok=True)
    ready_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = [*ENTRY, *_background_argv(argv, pid_file, ready_file)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # its lines reach the log as they are written
    with open(log_file, "w") as log:
        # A session of its own: no terminal to take Ctrl-C or SIGHUP from, and a process group that `down` can
        # signal whole. No die-with-parent: it must outlive this process.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    deadline = time.monotonic() + ready_timeout_s + READY_MARGIN_S
    try:
        while not ready_file.exists():
            if proc.poll() is not None:
                _abandon(proc, pid_file, ready_file)
                print(f"moemesh up: the background mesh exited with code {proc.returncode} before it was ready; "
                      f"its log ({log_file}) ends:{tail(log_file)}", file=sys.stderr)
                return None
            if time.monotonic() > deadline:
                raise TimeoutError
            time.sleep(0.2)
        records = read_ready_file(ready_file)
    except (TimeoutError, OSError, ValueError) as e:
        _abandon(proc, pid_file, ready_file)
        why = "not ready in time" if isinstance(e, TimeoutError) else f"its ready file was unreadable ({e})"
        print(f"moemesh up: the background mesh was {why}; stopped it. Its log ({log_file}) ends:{tail(log_file)}",
              file=sys.stderr)
        return None
    except BaseException:  # Ctrl-C while waiting: the mesh was never handed over, so it goes too
        _abandon(proc, pid_file, ready_file)
        raise
    return proc.pid, records


def _abandon(proc: subprocess.Popen, pid_file: Path, ready_file: Path) -> None:
    """Stop a background mesh that never became ready (and whatever of its group is left), and its files."""
    stop(proc.pid, 15)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(KILL_GRACE_S)
    remove_pid_file(pid_file, proc.pid)
    with contextlib.suppress(FileNotFoundError):
        ready_file.unlink()


def _background_argv(argv: Sequence[str], pid_file: Path, ready_file: Path) -> list[str]:
    """ARGV (`up ...`) for the background `up`: marked as such, with the pid and ready files it writes put
    right after `up`, so that ARGV's own --ready-file (last wins) and worker options (after `--`) stay as given."""
    argv = list(argv)
    at = argv.index("up") + 1
    return [*argv[:at], "--in-background", "--pid-file", str(pid_file), "--ready-file", str(ready_file), *argv[at:]]


def tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    """The last `n` lines of `path`, indented, after a newline."""
    try:
        lines = path.read_text(errors="replace").splitlines()[-n:]
    except OSError as e:
        return f"\n    (unreadable: {e})"
    return "".join(f"\n    {line}" for line in lines) or "\n    (empty)"


def down_command(pid_file: Path) -> str:
    return "moemesh down" if pid_file == default_pid_file() else f"moemesh down --pid-file {pid_file}"


# ---- down ------------------------------------------------------------------------------------------------------


STOPPED, KILLED, STUCK = "stopped", "killed", "stuck"


def stop(pid: int, timeout_s: float) -> str:
    """SIGTERM to the mesh of `up` process `pid`, SIGKILL to what is left after `timeout_s`. Returns STOPPED (it
    stopped on SIGTERM), KILLED (it needed SIGKILL) or STUCK (processes still there even so).

    A background `up` leads its process group: the whole group is signalled (its services included, in case `up`
    is gone); an `up` in a terminal's job group gets the signals alone and stops its services itself."""
    try:
        leads = os.getpgid(pid) == pid
    except ProcessLookupError:
        return STOPPED

    def left() -> list[int]:
        return group_members(pid) if leads else [pid] if alive(pid) else []

    def signal_all(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if leads:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)

    signal_all(signal.SIGTERM)
    if _wait_gone(left, timeout_s):
        return STOPPED
    signal_all(signal.SIGKILL)
    return KILLED if _wait_gone(left, KILL_GRACE_S) else STUCK


def _wait_gone(left: Callable[[], list[int]], timeout_s: float) -> bool:
    """Whether `left()` came up empty within `timeout_s`."""
    deadline = time.monotonic() + max(0.0, timeout_s)
    while left():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True
