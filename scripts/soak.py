"""Soak: steady load on a real mesh while workers and gateways are killed (SIGKILL) and replaced, for minutes.

    python scripts/soak.py --duration 300 --kill-every 20 --clients 4
    python scripts/soak.py --duration 120 --kill-every 10 --clients 4 --kill-gateways

Starts `moemesh up` (2 gateways, 1 prefill + 2 decode workers by default), sends greedy requests from `--clients`
threads without pause (each an SDK client given every gateway), and every `--kill-every` seconds kills a random
prefill or decode worker, or with `--kill-gateways` a random gateway too. A killed worker is replaced here (`moemesh
serve ROLE`, registering with every gateway); a killed gateway `moemesh up` starts again on its ports, where the
workers register again.
At the end it prints: requests sent, completed (and whether each completion equals the in-process engine's greedy
output), migrated (between workers, the gateways' counters), resumed (streams the SDK carried to another gateway),
failed with a clear error, lost (no answer within the deadline, or an error without a message), and the mesh
processes' resident memory at start and end.
Not run in CI (minutes long); `docs/benchmarks.md` records a run.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

# Replacements are forked from this process while its clients' gRPC threads run: gRPC's fork handlers then abort
# at random ("Check failed: next_worker->state == KICKED"). The children exec at once and use no gRPC of ours.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

PROMPTS = [f"Request {i}: the mesh serves " + "and keeps serving " * (i % 7) for i in range(16)]


def rss_mb(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) / 1024 if m else 0.0


def mesh_pids(root_pid: int) -> list[int]:
    """The `moemesh up` process and every descendant."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        pid, ppid = map(int, line.split())
        children.setdefault(ppid, []).append(pid)
    todo, seen = [root_pid], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo += children.get(pid, [])
    return seen


def gateway_pids(root_pid: int) -> list[int]:
    """The gateways `moemesh up` runs now (it starts a dead one again, under a new pid)."""
    pids = []
    for pid in mesh_pids(root_pid)[1:]:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"gateway" in argv and b"serve" in argv:
            pids.append(pid)
    return pids


def migrations(metrics_addr: str) -> float:
    body = urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=5).read().decode()
    m = re.search(r"^moemesh_request_migrations_total (\S+)$", body, re.M)
    return float(m.group(1)) if m else 0.0


class _Resumes(logging.Handler):
    """Counts the SDK's "resuming" log lines: streams carried to another gateway."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "resuming" in record.getMessage():
            self.count += 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=300)
    p.add_argument("--kill-every", type=float, default=20)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--timeout", type=float, default=60, help="each request's deadline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gateways", type=int, default=2, help="gateway replicas")
    p.add_argument("--kill-gateways", action="store_true", help="gateways are killed too (and replaced)")
    args = p.parse_args()

    from moemesh.engine.engine import Engine, EngineConfig
    from moemesh.engine.sampling_params import SamplingParams
    from moemesh.model.default import default_model_dir
    from moemesh.sdk import MeshClient, MeshError, RetryPolicy
    from moemesh.service.launch import ServiceProcess, start_mesh, start_service

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    engine = Engine(EngineConfig(model=str(default_model_dir()), kv_cache_mb=64))
    reference = [c.token_ids for c in engine.generate(PROMPTS, params)]
    del engine
    mesh = start_mesh(["--gateways", str(args.gateways), "--prefill", "1", "--decode", "2", "--transfer", "relay"])
    gateways = {name: r.address for name, r in mesh.services.items() if name.startswith("gateway")}
    targets = ",".join(gateways.values())
    resumes = _Resumes()
    for name in ("moemesh.sdk.client", "moemesh.sdk.aio"):
        logging.getLogger(name).addHandler(resumes)
        logging.getLogger(name).setLevel(logging.INFO)
    rng = random.Random(args.seed)
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    replacements: list[ServiceProcess] = []
    role_of: dict[int, str] = {}  # replacement pid -> its role
    kv_addr = mesh.services["kvtransfer"].address
    # The mesh's own workers still running: name -> pid.
    workers = {name: r.pid for name, r in mesh.services.items() if name.startswith(("prefill", "decode"))}
    kills, rss_start, rss_end, migrated = 0, 0.0, 0.0, 0.0
    try:
        time.sleep(2)
        pids = mesh_pids(mesh.proc.pid)
        rss_start = sum(rss_mb(pid) for pid in pids)
        # Migrations between workers, as each of the mesh's own gateways counted them while it lived.
        counted = {name: mesh.services[name].metrics_address for name in gateways}
        migrated = -sum(migrations(address) for address in counted.values())

        def client(k: int) -> None:
            # Patient enough for a replacement gateway to start (a few seconds) when both gateways are down.
            with MeshClient(targets, timeout_s=args.timeout, retry_policy=RetryPolicy(retries=8, max_backoff_s=2.0),
                            max_resumes=4) as c:
                i = k
                while not stop.is_set():
                    idx = i % len(PROMPTS)
                    i += args.clients
                    with lock:
                        counts["sent"] += 1
                    try:
                        out = c.generate(prompt=PROMPTS[idx], max_tokens=args.max_tokens, temperature=0,
                                         ignore_eos=True)
                        kind = "completed" if out.token_ids == reference[idx] else "wrong"
                    except MeshError as e:
                        clear = bool(str(e).strip()) and e.code.name != "DEADLINE_EXCEEDED"
                        kind = "failed" if clear else "lost"
                        with lock:
                            errors[f"{e.code.name}: {str(e)[:90]}"] += 1
                    with lock:
                        counts[kind] += 1

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
        for t in threads:
            t.start()
        end = time.monotonic() + args.duration
        while time.monotonic() < end:
            time.sleep(min(args.kill_every, max(end - time.monotonic(), 0)))
            if time.monotonic() >= end:
                break
            roles = {pid: n.split("-")[0] for n, pid in workers.items()}
            roles.update({r.pid: role_of[r.pid] for r in replacements if r.poll() is None})
            if args.kill_gateways:
                roles.update(dict.fromkeys(gateway_pids(mesh.proc.pid), "gateway"))
            pid = rng.choice(sorted(roles))
            role = roles[pid]
            name = next((n for n, p in workers.items() if p == pid),
                        next((n for n, r in mesh.services.items() if r.pid == pid), f"replacement {role} {pid}"))
            if name in counted:  # its counter dies with it: read it first
                migrated += migrations(counted.pop(name))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            kills += 1
            workers = {n: p for n, p in workers.items() if p != pid}
            if role == "gateway":  # `moemesh up` starts it again
                print(f"t={args.duration - (end - time.monotonic()):6.1f}s killed {name}; so far {dict(counts)}",
                      flush=True)
                continue
            # Not waited for: it registers with the gateways once loaded, as a replacement in production would.
            proc = start_service(role, ["--port", "0", "--metrics-port", "-1", "--gateway", targets,
                                        "--kvtransfer", kv_addr, "--eplb", "", "--procs-per-host", "3"],
                                 stderr=subprocess.DEVNULL, ready_timeout_s=None)
            role_of[proc.pid] = role
            replacements.append(proc)
            print(f"t={args.duration - (end - time.monotonic()):6.1f}s killed {name} ({role}); "
                  f"started a replacement; so far {dict(counts)}", flush=True)
        stop.set()
        for t in threads:
            t.join(args.timeout + 10)
        pids = mesh_pids(mesh.proc.pid) + [r.pid for r in replacements if r.poll() is None]
        rss_end = sum(rss_mb(pid) for pid in pids)
        migrated += sum(migrations(address) for address in counted.values())
    finally:
        stop.set()
        for r in replacements:
            if r.poll() is None:
                r.send_signal(signal.SIGTERM)
        mesh.stop()
        for r in replacements:
            try:
                r.wait(10)
            except subprocess.TimeoutExpired:
                r.kill()
    victims = "a worker or gateway" if args.kill_gateways else "a worker"
    print(f"\nsoak: {args.duration:.0f} s, {args.clients} clients, {args.gateways} gateways, {victims} killed every "
          f"{args.kill_every:.0f} s ({kills} kills)")
    print(f"  sent {counts['sent']}, completed {counts['completed']} (all equal to the engine's greedy output: "
          f"{counts['wrong'] == 0}), migrated {migrated:.0f} (counted by the first gateways while they lived), "
          f"resumed at another gateway {resumes.count}, "
          f"failed with a clear error {counts['failed']}, "
          f"lost {counts['lost']}, wrong {counts['wrong']}")
    for msg, n in errors.most_common(5):
        print(f"    {n} x {msg}")
    print(f"  resident memory of the mesh: {rss_start:.0f} MB at start, {rss_end:.0f} MB at end")
    return 0 if counts["lost"] == 0 and counts["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
