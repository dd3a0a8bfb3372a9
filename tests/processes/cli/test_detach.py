"""`moemesh up --detach` / `moemesh down`, the README's first command as written, the logs `moemesh up` hands its
services (quiet on a terminal, the format chosen once), and `moemesh bench serve` finding the served model's
tokenizer through the gateway's /v1/models `root`: real processes, their output, exit codes and files."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from moemesh.model.default import TINY_VERSION
from moemesh.services.cli.detach import alive, read_pid, stop
from moemesh.telemetry.readiness import read_ready_file
from tests.net import free_port
from tests.paths import ROOT
from tests.processes.mesh.waits import until

ENTRY = [sys.executable, "-m", "moemesh.services.cli.main"]
# A row of `moemesh up`'s table: name, address, pid.
ROW = re.compile(r"^\s+(\S+)\s+(\S+:\d+)\s+(\d+)$")


def moemesh(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*ENTRY, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def table_pids(output: str) -> set[int]:
    return {int(m.group(3)) for m in map(ROW.match, output.splitlines()) if m}


@contextlib.contextmanager
def stopped_after(pid_file: Path) -> Iterator[None]:
    """Whatever happens in the block, no mesh of `pid_file` outlives the test."""
    try:
        yield
    finally:
        pid = read_pid(pid_file)
        if pid is not None and alive(pid):
            stop(pid, 10)


def readme_first_command() -> str:
    """The README's first command, from the first `moemesh` on (what follows the installs)."""
    block = (ROOT / "README.md").read_text().split("\n\n    ", 1)[1].split("\n", 1)[0]
    return block[block.index("moemesh "):]


def test_readme_first_command_starts_answers_and_stops(tmp_path: Path, tiny_dir: Path) -> None:
    command = readme_first_command()
    assert "moemesh up --detach" in command and command.endswith("; moemesh down"), command
    # The default cache, pid and log files, in a cache of this test's own holding the embedded model already.
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"tiny-v{TINY_VERSION}-seed0").symlink_to(tiny_dir)
    # The command as written; only ports differ: the README's fixed 50051 and 8000 may be taken on a test host.
    port = free_port()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "moemesh"
    wrapper.write_text(f"""#!/bin/sh
cmd="$1"; shift
case "$cmd" in
  up) set -- up --grpc-port {port} --http-port 0 "$@" ;;
  complete) set -- complete --target 127.0.0.1:{port} "$@" ;;
  *) set -- "$cmd" "$@" ;;
esac
exec {sys.executable} -m moemesh.services.cli.main "$@"
""")
    wrapper.chmod(0o755)
    env = {**os.environ, "MOEMESH_CACHE_DIR": str(cache), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MOEMESH_LOG_FORMAT", None)
    with stopped_after(cache / "up.pid"):
        r = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=tmp_path, env=env,
                           timeout=400)
        assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("moemesh is up:"), r.stdout
    assert f"logs: {cache / 'up.log'}" in r.stdout and "`moemesh down` stops it" in r.stdout
    assert "The mesh is" in r.stdout and "moemesh down: stopped the mesh (pid " in r.stdout
    assert "Traceback" not in r.stderr
    # Nothing left: no process, no pid or ready file; the services' logs in the log file, as JSON (no terminal).
    pids = table_pids(r.stdout)
    assert len(pids) == 5, r.stdout  # kvtransfer, eplb, gateway, prefill-0, decode-0
    until(lambda: [p for p in pids if alive(p)], lambda left: left == [], 15, "the mesh's processes gone")
    assert not (cache / "up.pid").exists() and not (cache / "up.ready.json").exists()
    events = [json.loads(line)["event"] for line in (cache / "up.log").read_text().splitlines()
              if line.startswith("{")]
    assert any("registered with gateway" in e for e in events), events
    # Stopped already: `down` says so and fails.
    again = moemesh("down", env=env)
    assert again.returncode == 1 and "no mesh is running" in again.stderr


def test_detached_mesh_of_a_relative_model_serves_bench_serve_its_own_tokenizer(tmp_path: Path,
                                                                                small_dir: Path) -> None:
    pid_file, log_file = tmp_path / "run" / "mesh.pid", tmp_path / "logs" / "mesh.log"
    up = ["up", "--detach", "--model", small_dir.name, "--prefill", "0", "--grpc-port", "0", "--http-port", "0",
          "--pid-file", str(pid_file), "--log-file", str(log_file), "--log-format", "console"]
    with stopped_after(pid_file):
        r = moemesh(*up, cwd=small_dir.parent)  # the model named relative to the working folder
        assert r.returncode == 0, r.stdout + r.stderr
        pid = read_pid(pid_file)
        assert pid is not None and alive(pid)
        assert f"logs: {log_file}" in r.stdout and f"`moemesh down --pid-file {pid_file}` stops it" in r.stdout
        records = {s.name: s for s in read_ready_file(tmp_path / "run" / "mesh.ready.json")}
        # A second one on the same pid file: refused, the first untouched.
        second = moemesh(*up, cwd=small_dir.parent)
        assert second.returncode == 1 and f"a mesh is already running (pid {pid}" in second.stderr
        assert read_pid(pid_file) == pid and alive(pid)
        # /v1/models names the folder the model came from, absolute; bench serve counts with its tokenizer.
        http = records["gateway"].http_address
        with urllib.request.urlopen(f"http://{http}/v1/models", timeout=10) as resp:
            (card,) = json.loads(resp.read())["data"]
        assert card["root"] == str(small_dir)
        result = tmp_path / "bench.json"
        bench = moemesh("bench", "serve", "--url", f"http://{http}", "--num-prompts", "2", "--input-len", "16",
                        "--output-len", "2", "--warmup", "0", "--disable-tqdm", "--result-json", str(result),
                        cwd=tmp_path)
        assert bench.returncode == 0, bench.stdout + bench.stderr
        doc = json.loads(result.read_text())
        assert doc["config"]["tokenizer"] == str(small_dir) and doc["summary"]["prompt_len_mismatches"] == 0
        # The services logged in the format `up` was told, to the log file.
        lines = log_file.read_text().splitlines()
        metrics = [line for line in lines if "decode metrics on" in line]
        assert metrics and not metrics[0].startswith("{") and "[info" in metrics[0], lines[:20]
        down = moemesh("down", "--pid-file", str(pid_file))
        assert down.returncode == 0 and f"stopped the mesh (pid {pid})" in down.stdout, down.stdout + down.stderr
    until(lambda: [p for p in {s.pid for s in records.values()} | {pid} if alive(p)], lambda left: left == [], 15,
          "the mesh's processes gone")
    assert not pid_file.exists() and not (tmp_path / "run" / "mesh.ready.json").exists()


def test_mesh_on_a_terminal_is_quiet_and_down_stops_a_foreground_up(tmp_path: Path, tiny_dir: Path) -> None:
    # stderr on a terminal (a pseudo-terminal here), stdout a pipe: the services' info lines stay off the terminal.
    master, slave = os.openpty()
    seen = bytearray()

    def drain() -> None:
        with contextlib.suppress(OSError):  # EIO once every writer closed the terminal
            while data := os.read(master, 1 << 16):
                seen.extend(data)

    pid_file, ready = tmp_path / "up.pid", tmp_path / "ready.json"
    env = {k: v for k, v in os.environ.items() if k not in ("MOEMESH_LOG_FORMAT", "MOEMESH_LOG_LEVEL")}
    proc = subprocess.Popen([*ENTRY, "up", "--model", str(tiny_dir), "--prefill", "0", "--grpc-port", "0",
                             "--http-port", "0", "--pid-file", str(pid_file), "--ready-file", str(ready)],
                            stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, text=True, cwd=ROOT,
                            env=env)
    os.close(slave)
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        until(lambda: ready.exists() or proc.poll() is not None, bool, 240, "moemesh up ready")
        assert proc.poll() is None, bytes(seen).decode(errors="replace")
        assert read_pid(pid_file) == proc.pid
        services = {r.pid for r in read_ready_file(ready)}
        down = moemesh("down", "--pid-file", str(pid_file), "--timeout", "60")
        assert down.returncode == 0 and f"stopped the mesh (pid {proc.pid})" in down.stdout, down.stderr
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        reader.join(10)
        os.close(master)
    assert proc.returncode == 0 and "moemesh is up:" in out
    terminal = bytes(seen).decode(errors="replace")
    assert "metrics on" not in terminal and '{"event"' not in terminal, terminal
    until(lambda: [p for p in services if alive(p)], lambda left: left == [], 15, "the services gone")
    assert not pid_file.exists()


def test_down_kills_what_ignores_sigterm_and_reports_no_mesh(tmp_path: Path) -> None:
    # Stands in for a hung `moemesh up` (its command line says so, as down checks): ignores SIGTERM, leads its group.
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
            "time.sleep(120)")
    hung = subprocess.Popen([sys.executable, "-c", code, "moemesh.services.cli.main", "up"], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    pid_file = tmp_path / "up.pid"
    try:
        assert hung.stdout.readline() == "ready\n"
        pid_file.write_text(f"{hung.pid}\n")
        t0 = time.monotonic()
        r = moemesh("down", "--pid-file", str(pid_file), "--timeout", "1", timeout=60)
        assert r.returncode == 0 and "killed: it did not stop within 1 s" in r.stdout, r.stdout + r.stderr
        assert time.monotonic() - t0 < 30
        assert hung.wait(10) == -signal.SIGKILL and not pid_file.exists()
    finally:
        if hung.poll() is None:
            hung.kill()
            hung.wait()
        hung.stdout.close()
    r = moemesh("down", "--pid-file", str(pid_file))
    assert r.returncode == 1 and "no mesh is running (no pid file" in r.stderr
    pid_file.write_text(f"{hung.pid}\n")  # a pid file left behind by a mesh that is gone
    r = moemesh("down", "--pid-file", str(pid_file))
    assert r.returncode == 1 and "is gone; removed the stale file" in r.stderr and not pid_file.exists()


@pytest.mark.parametrize("cmd", ["up", "generate"])
def test_a_bad_config_field_is_one_line_before_anything_starts(tmp_path: Path, tiny_dir: Path, cmd: str) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((tiny_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "hidden_size": "abc"}))
    t0 = time.monotonic()
    r = moemesh(cmd, "--model", str(bad), *(["hi"] if cmd == "generate" else ["--grpc-port", "0"]), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "hidden_size must be an integer, got 'abc'" in r.stderr and str(bad) in r.stderr
    assert "listening" not in r.stdout + r.stderr and time.monotonic() - t0 < 60  # no service was started
    if cmd == "up":
        missing = moemesh("up", "--detach", "--model", str(tmp_path / "missing"), "--pid-file",
                          str(tmp_path / "up.pid"))
        assert missing.returncode == 2 and f"model folder {tmp_path / 'missing'} does not exist" in missing.stderr
        assert "tokenizer" not in missing.stderr and not (tmp_path / "up.pid").exists()
