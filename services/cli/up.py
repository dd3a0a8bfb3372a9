"""`moemesh up`: the whole mesh on this host as processes on loopback (the embedded default).

Starts kvtransfer, eplb, the gateway, then the prefill and decode workers, each its own process
running `moemesh serve NAME`; prints where each listens once all are ready (and, with --ready-file PATH,
writes the same as JSON for programs: `moemesh.telemetry.readiness`); on Ctrl-C or SIGTERM
stops them all, leaving no process behind (children also die with this process: PR_SET_PDEATHSIG).

Locked down: `--api-key` / `--api-key-file` go to the gateway (the key through its environment, not
its command line); `--tls-dir DIR` (ca.crt, tls.crt, tls.key: a Kubernetes TLS secret's names) makes
every service speak mutual TLS, through the MOEMESH_TLS_* variables every child reads.

In the background: `--detach` runs the same command as a background process and returns once the mesh is
ready; `moemesh down` stops it (`moemesh.services.cli.detach`). Logs: the services write theirs to this
process's stderr (or `--log-file`), in one format decided here (`--log-format`), at `warning` on a terminal
and `info` elsewhere unless `--log-level` says otherwise.

`--model` is checked here (the folder, every config.json field) before any process starts: a bad one is one
line naming the field, not a worker's traceback seconds later.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from moemesh.chat.registry import REASONING_PARSER_OPTIONS, TOOL_PARSER_OPTIONS
from moemesh.device import add_device_argument
from moemesh.service import cpus
from moemesh.service.cpus import CpuPlan
from moemesh.service.launch import ServiceProcess, start_service
from moemesh.services.cli import detach
from moemesh.services.gateway.routers import ROUTERS
from moemesh.telemetry.readiness import GRPC, HTTP, METRICS, ServiceRecord, table_rows, write_ready_file
from moemesh.transfer.planes import PLANES

# --tls-dir's files (cert-manager's and `kubectl create secret tls`'s names) and the variable of each.
TLS_FILES = {"ca": "ca.crt", "cert": "tls.crt", "key": "tls.key"}
TLS_ENV = {"ca": "MOEMESH_TLS_CA", "cert": "MOEMESH_TLS_CERT", "key": "MOEMESH_TLS_KEY"}
# moemesh.telemetry.logs' LOG_FORMATS and LOG_LEVELS, spelled out: importing it (structlog, OpenTelemetry) would
# double the start-up time of every `moemesh` command (tests/unit/cli checks the lists agree).
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="run the whole mesh on this host",
                       description="Start gateway, kvtransfer, eplb and prefill/decode workers as processes on "
                                   "loopback; Ctrl-C stops them all.")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded tiny model)")
    p.add_argument("--grpc-port", type=int, default=50051, help="the gateway's gRPC port")
    p.add_argument("--http-port", type=int, default=8000,
                   help="the gateway's OpenAI-compatible REST port (0 picks one, -1 serves no REST)")
    p.add_argument("--gateways", type=int, default=1,
                   help="gateway replicas (each on the next ports up from --grpc-port and --http-port); every worker "
                        "registers with all of them, an SDK client given them all goes on at another when one dies, "
                        "and a gateway that dies is started again on its ports")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers (0: colocated, decode prefills)")
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    p.add_argument("--ep-size", type=int, default=1,
                   help="ranks per prefill/decode instance (an EP group with DP attention; one process each)")
    p.add_argument("--transfer", default=None, choices=PLANES.names(cross_process=True),
                   help="KV data plane (default: tcp, straight from the prefill to the decode worker on loopback; "
                        "relay, through kvtransfer's gRPC, when TLS is on: the tcp plane is not encrypted)")
    p.add_argument("--router", default=None, choices=ROUTERS.names(),
                   help="the gateway's routing policy (default: $MOEMESH_ROUTER if set, else prefix_affinity)")
    g_chat = p.add_argument_group("chat (passed to the gateway)")
    g_chat.add_argument("--tool-call-parser", default=None, choices=TOOL_PARSER_OPTIONS,
                        help="how tool calls are read from chat outputs (default: auto, detected from the tokenizer)")
    g_chat.add_argument("--reasoning-parser", default=None, choices=REASONING_PARSER_OPTIONS,
                        help="how reasoning is split from chat outputs (default: auto, detected from the template)")
    g_chat.add_argument("--chat-template", default=None, metavar="FILE",
                        help="a chat template file replacing the model's, or a shipped one's name (deepseek_v3_tools)")
    add_device_argument(p, "; cuda: the host's GPUs dealt out one per worker process, in start order, "
                           "round robin when there are more workers than GPUs")
    p.add_argument("--pin", default="auto", choices=("auto", "off"),
                   help="on a CPU host, give each decode worker cores of its own and every other process the rest "
                        "(auto: when a core is left for the others; off: the OS places every process)")
    p.add_argument("--host", default="127.0.0.1", help="address every service listens on")
    p.add_argument("--ready-timeout", type=float, default=300, help="seconds to wait for every service")
    p.add_argument("--ready-file", default=None, metavar="PATH",
                   help="once every service is ready, also write the table of services as JSON to PATH (for "
                        "programs: launchers wait for it); removed when the mesh stops")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="API key the gateway requires on every gRPC and /v1 REST call (repeatable, or "
                        "comma-separated; default: $MOEMESH_API_KEY if set, else none)")
    p.add_argument("--api-key-file", default=None, metavar="FILE", help="file of API keys, one per line")
    p.add_argument("--tls-dir", default=None, metavar="DIR",
                   help="mutual TLS between all services (and for clients of the gateway's gRPC API) with "
                        f"DIR/{TLS_FILES['ca']}, DIR/{TLS_FILES['cert']}, DIR/{TLS_FILES['key']}; the "
                        "certificate must name --host (default: $MOEMESH_TLS_* if set, else plain text)")
    g = p.add_argument_group("background and logs")
    g.add_argument("--detach", action="store_true",
                   help="start the mesh in the background, wait until it is ready, print where it listens and "
                        "return; `moemesh down` stops it")
    g.add_argument("--pid-file", default=None, metavar="PATH",
                   help="where the mesh's pid is kept while it runs (default with --detach: <cache>/up.pid, the "
                        "cache being $MOEMESH_CACHE_DIR or ~/.cache/moemesh; `moemesh down --pid-file` reads it)")
    g.add_argument("--log-file", default=None, metavar="PATH",
                   help="the services' logs (and, with --detach, this command's output) go to PATH instead of "
                        "the terminal (default with --detach: up.log next to the pid file)")
    g.add_argument("--log-format", default=os.environ.get("MOEMESH_LOG_FORMAT") or "auto", choices=LOG_FORMATS,
                   help="the services' log lines: console (for people), json (for collectors), or auto: console "
                        "on a terminal, json otherwise (default: $MOEMESH_LOG_FORMAT if set, else auto)")
    g.add_argument("--log-level", default=os.environ.get("MOEMESH_LOG_LEVEL") or None, choices=LOG_LEVELS,
                   help="the services' log level (default: $MOEMESH_LOG_LEVEL if set, else warning on a terminal "
                        "and info otherwise)")
    g.add_argument("--in-background", action="store_true", help=argparse.SUPPRESS)  # set by --detach for its child
    p.add_argument("worker_args", nargs=argparse.REMAINDER,
                   help="after `--`: extra options for every prefill and decode worker (e.g. --kv-cache-mb 256)")
    p.set_defaults(func=run)


def _chat_args(args: argparse.Namespace) -> list[str]:
    """The gateway's chat options that `up` was given (a template path made absolute: the gateway's working
    folder is the same, but its command line is logged and may be rerun from elsewhere)."""
    out = []
    for flag, value in (("--tool-call-parser", args.tool_call_parser), ("--reasoning-parser", args.reasoning_parser),
                        ("--chat-template", _template_arg(args.chat_template))):
        if value:
            out += [flag, value]
    return out


def _template_arg(value: str | None) -> str | None:
    if not value or not Path(value).exists():
        return value  # a shipped template's name (or a missing file, which the gateway reports)
    return str(Path(value).resolve())


class Mesh:
    """`moemesh up`'s children in start order, each one's stdout (its readiness lines) read by a thread."""

    def __init__(self, host: str, log: IO[str] | None = None) -> None:
        self.host = host
        self.log = log
        self.children: list[ServiceProcess] = []

    def start(self, name: str, service: str, args: list[str], env: dict[str, str]) -> ServiceProcess:
        # Every service's logs go where this process's go (its stderr: the terminal, or the log file of a mesh in
        # the background), or to --log-file.
        child = start_service(service, ["--host", self.host, *args], name=name, env=env, stderr=self.log,
                              ready_timeout_s=None)
        self.children.append(child)
        return child

    def wait_ready(self, children: list[ServiceProcess], deadline: float) -> None:
        """Wait for each child's `NAME listening on ADDR` line."""
        for c in children:
            c.wait_ready(GRPC, deadline=deadline)

    def wait_http(self, child: ServiceProcess, deadline: float) -> None:
        """Wait for `child`'s `NAME http listening on ADDR` line (printed after its gRPC one)."""
        child.wait_ready(HTTP, deadline=deadline)

    def records(self) -> list[ServiceRecord]:
        """One per child, from its readiness lines. A metrics line follows its gRPC line at once: by the time
        the workers registered with the gateway, every one was read."""
        out = []
        for c in self.children:
            a = c.addresses()
            out.append(ServiceRecord(c.name, c.pid, a.get(GRPC, ""), a.get(HTTP, ""), a.get(METRICS, "")))
        return out

    def stop(self, timeout_s: float = 15) -> None:
        # Workers first (they deregister), then the services they talk to.
        for c in reversed(self.children):
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for c in self.children:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()

    def exited(self) -> list[ServiceProcess]:
        return [c for c in self.children if c.proc.poll() is not None]


def run(args: argparse.Namespace) -> int:
    extra = [a for a in args.worker_args if a != "--"]
    env = dict(os.environ)
    for flag, value in (("--ep-size", args.ep_size), ("--gateways", args.gateways)):
        if value < 1:
            print(f"moemesh up: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    # Everything a user can get wrong is checked here, before any process starts (with --detach, before the
    # background one does: the error reaches the terminal).
    try:
        client = _security(args, env)
        if args.transfer is None:
            # The direct plane skips kvtransfer's hop (first inter-token gap, 64 prompts at concurrency 4 on 2
            # cores: median 20-23 against 29 ms, p90 38-43 against 60-70; docs/benchmarks.md); it carries no TLS.
            args.transfer = "relay" if client.tls else "tcp"
        if args.model:  # the workers and the gateway read it from their own working folder: made absolute
            args.model = str(_check_model(args.model))
        _log_env(args, sys.stderr)  # the format and level are valid (resolved below, for where the logs go)
    except ValueError as e:
        print(f"moemesh up: {e}", file=sys.stderr)
        return 2
    if args.detach and not args.in_background:
        return _detach(args, client)
    pid_file = Path(args.pid_file).absolute() if args.pid_file else None
    if pid_file is not None and not _claim_pid_file(pid_file):
        return 1
    log: IO[str] | None = None
    try:
        # A background `up`'s stderr already is its log file (opened by `--detach`, which also wrote this command's
        # output there); opened again, the two offsets would overwrite each other.
        if args.log_file and not args.in_background:
            Path(args.log_file).parent.mkdir(parents=True, exist_ok=True)
            log = open(args.log_file, "w")  # closed below, once the services that write to it stopped
        env.update(_log_env(args, log or sys.stderr))
        return _serve(args, env, extra, client, log)
    finally:
        if pid_file is not None:
            detach.remove_pid_file(pid_file, os.getpid())
        if log is not None:
            log.close()


def _serve(args: argparse.Namespace, env: dict[str, str], extra: list[str], client: ClientSecurity,
           log: IO[str] | None) -> int:
    """Start the mesh, serve until SIGINT/SIGTERM (or the gateway's death), stop it; the exit code."""
    mesh = Mesh(args.host, log)
    stopping = False
    plan = HostCores.for_mesh(args, extra)
    if plan.pinned is not None:
        env = plan.env(env, "service", 0)  # the gateway and the balancer: the shared cores

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    deadline = time.monotonic() + args.ready_timeout
    try:
        metrics = ["--metrics-port", "0"]  # several services on one host: no fixed metrics ports
        kv = mesh.start("kvtransfer", "kvtransfer", ["--port", "0", *metrics], plan.env(env, "kvtransfer", 0))
        eplb = mesh.start("eplb", "eplb", ["--port", "0", *metrics], env)
        mesh.wait_ready([kv], deadline)
        gw_args = ["--kvtransfer", kv.address, *metrics] + (["--model", args.model] if args.model else []) + (
            ["--router", args.router] if args.router else []) + _chat_args(args)
        gateways = [mesh.start(gateway_name(i), "gateway", [*first_ports(args, i), *gw_args],
                               {**env, **client.gateway_env}) for i in range(args.gateways)]
        mesh.wait_ready([*gateways, eplb], deadline)
        if args.http_port != -1:
            for gateway in gateways:
                mesh.wait_http(gateway, deadline)
        # Where each gateway listens (ports asked as 0 resolved): one started again after a death takes the same.
        gateway_ports = {g.name: _bound_ports(g) for g in gateways}
        addresses = ",".join(g.address for g in gateways)
        common = ["--port", "0", *metrics, "--gateway", addresses, "--kvtransfer", kv.address,
                  "--eplb", eplb.address,
                  "--transfer", args.transfer, *(["--model", args.model] if args.model else []), *extra]
        devices = iter(worker_devices(args.device, (args.prefill + args.decode) * args.ep_size))
        workers = [w for role, count in (("prefill", args.prefill), ("decode", args.decode)) for i in range(count)
                   for w in _start_instance(mesh, role, i, args.ep_size, common + plan.worker_args(role, i),
                                            plan.env(env, role, i), devices)]
        mesh.wait_ready(workers, deadline)
        # Workers register in the background once they listen; until they have, a first request would
        # find no prefill worker and run colocated. Every rank of an EP group is a worker.
        for gateway in gateways:
            _wait_registered(gateway.address, args.prefill * args.ep_size, args.decode * args.ep_size, deadline,
                             client)
        records = mesh.records()
        print(_table(records, args, client, _stop_hint(args)), flush=True)
        if args.ready_file:  # after the table: a launcher that sees the file finds the table in the output too
            write_ready_file(args.ready_file, records)
        reported: set[int] = set()
        restarts = GatewayRestarts()
        while not stopping:
            for dead in mesh.exited():
                if dead.pid in reported:
                    continue
                reported.add(dead.pid)
                if dead.name.startswith("gateway"):
                    # Gateways are stateless: one started again on the same ports serves as soon as the workers'
                    # next heartbeats register them again, and SDK clients resume at the others meanwhile.
                    if not restarts.allow(dead.name):
                        print(f"moemesh up: {dead.name} exited with code {dead.proc.returncode} again, "
                              f"{GATEWAY_RESTARTS} times within {GATEWAY_RESTART_WINDOW_S:g} s; stopping the mesh",
                              file=sys.stderr)
                        return 1
                    print(f"moemesh up: {dead.name} exited with code {dead.proc.returncode}; starting it again on "
                          "the same ports", file=sys.stderr)
                    mesh.start(dead.name, "gateway", [*gateway_ports[dead.name], *gw_args],
                               {**env, **client.gateway_env})
                    continue
                # The mesh outlives a worker, as it would in production: the gateway routes around it; and
                # kvtransfer (requests run colocated meanwhile) and the balancer (placements freeze).
                print(f"moemesh up: {dead.name} exited with code {dead.proc.returncode}; the others keep serving",
                      file=sys.stderr)
            time.sleep(0.2)
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"moemesh up: {e}", file=sys.stderr)
        return 1
    finally:
        if args.ready_file:  # a mesh that stopped is not ready
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.ready_file)
        mesh.stop()


# A gateway that dies this many times within the window is not started again: something stops it for good.
GATEWAY_RESTARTS = 3
GATEWAY_RESTART_WINDOW_S = 60.0


class GatewayRestarts:
    """When a dead gateway may be started again: unless it died GATEWAY_RESTARTS times in the last window."""

    def __init__(self) -> None:
        self._deaths: dict[str, list[float]] = {}

    def allow(self, name: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        deaths = [t for t in self._deaths.get(name, []) if now - t < GATEWAY_RESTART_WINDOW_S] + [now]
        self._deaths[name] = deaths
        return len(deaths) < GATEWAY_RESTARTS


def _bound_ports(gateway: ServiceProcess) -> list[str]:
    """The ports a ready gateway listens on, as its options (--http-port -1 when it serves no REST)."""
    http = gateway.addresses().get(HTTP)
    return ["--port", gateway.address.rsplit(":", 1)[1], "--http-port", http.rsplit(":", 1)[1] if http else "-1"]


def gateway_name(index: int) -> str:
    """The first gateway is "gateway" (as with one), the others "gateway-1", "gateway-2", ..."""
    return "gateway" if index == 0 else f"gateway-{index}"


def first_ports(args: argparse.Namespace, index: int) -> list[str]:
    """Gateway `index`'s ports: the next ones up from --grpc-port / --http-port (0 picks any, -1: no REST)."""
    grpc_port = args.grpc_port + index if args.grpc_port else 0
    http_port = args.http_port + index if args.http_port > 0 else args.http_port
    return ["--port", str(grpc_port), "--http-port", str(http_port)]


def _stop_hint(args: argparse.Namespace) -> str | None:
    """How to stop this mesh, for the end of the table (None: Ctrl-C, the default)."""
    if not args.pid_file:
        return None
    down = detach.down_command(Path(args.pid_file).absolute())
    return f"`{down}` stops everything." if args.in_background else f"Ctrl-C or `{down}` stops everything."


def _check_model(model: str) -> Path:
    """The --model folder, absolute, its config.json checked (ModelConfigError, a ValueError, when it is bad)."""
    from moemesh.model.config_check import check_model_dir

    return check_model_dir(model)


def _log_env(args: argparse.Namespace, stream: IO[str]) -> dict[str, str]:
    from moemesh.telemetry.logs import launcher_log_env

    return launcher_log_env(args.log_format, args.log_level, stream)


def _claim_pid_file(pid_file: Path) -> bool:
    """Write this process's pid to `pid_file`, unless another running `up` holds it (then say so: False)."""
    try:
        detach.write_pid_file(pid_file, os.getpid())
        return True
    except FileExistsError:
        pass
    holder = detach.read_pid(pid_file)
    if holder is not None and holder != os.getpid() and detach.is_moemesh_up(holder):
        print(f"moemesh up: a mesh is already running (pid {holder}, pid file {pid_file}); "
              f"`{detach.down_command(pid_file)}` stops it", file=sys.stderr)
        return False
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()  # stale: its mesh is gone
    try:
        detach.write_pid_file(pid_file, os.getpid())
    except FileExistsError:  # another `up` claimed it in between
        print(f"moemesh up: another mesh took the pid file {pid_file} just now", file=sys.stderr)
        return False
    return True


def _detach(args: argparse.Namespace, client: ClientSecurity) -> int:
    """`up --detach`: this command again in the background (`detach.start`), and where the ready mesh listens."""
    pid_file = Path(args.pid_file).absolute() if args.pid_file else detach.default_pid_file()
    log_file = Path(args.log_file).absolute() if args.log_file else detach.beside(pid_file, ".log")
    ready_file = Path(args.ready_file).absolute() if args.ready_file else detach.beside(pid_file, ".ready.json")
    argv = getattr(args, "cli_argv", None) or sys.argv[1:]  # main() keeps the command line it parsed
    started = detach.start(argv, pid_file, log_file, ready_file, args.ready_timeout)
    if started is None:
        return 1
    pid, records = started
    print(_table(records, args, client, f"logs: {log_file}\n"
                                        f"running in the background (pid {pid}, pid file {pid_file}); "
                                        f"`{detach.down_command(pid_file)}` stops it."), flush=True)
    return 0


def worker_devices(device: str, count: int, num_gpus: int | None = None) -> list[str]:
    """The `--device` of each of `count` worker processes: `cuda` deals the host's GPUs out in turn (`num_gpus`:
    how many; default: as torch sees them), anything else goes to every worker as given."""
    if device != "cuda":
        return [device] * count
    if num_gpus is None:
        import torch

        num_gpus = torch.cuda.device_count()
    if num_gpus < 1:
        raise RuntimeError("--device cuda, but torch sees no GPU here (check CUDA_VISIBLE_DEVICES and the driver)")
    return [f"cuda:{k % num_gpus}" for k in range(count)]


def _start_instance(mesh: Mesh, role: str, index: int, ep_size: int, common: list[str], env: dict[str, str],
                    devices: Iterator[str]) -> list[ServiceProcess]:
    """One prefill or decode instance: a single worker, or an EP group of `ep_size` rank processes."""
    name = f"{role}-{index}"
    if ep_size == 1:
        return [mesh.start(name, role, ["--device", next(devices), *common], env)]
    from moemesh.worker.ep_args import free_local_addr

    group = ["--ep-size", str(ep_size), "--dist-init-addr", free_local_addr(), "--instance-id", name]
    return [mesh.start(f"{name}-dp{r}", role, ["--device", next(devices), *common, *group, "--ep-rank", str(r)], env)
            for r in range(ep_size)]


# How long an idle prefill worker's first new request waits for others arriving with it (--batch-wait-ms): a burst
# of a client's concurrent requests reaches it a few ms apart.
PREFILL_BATCH_WAIT_MS = 5.0


@dataclass
class HostCores:
    """How `up` splits this host's cores: engine threads per worker process (the cores divided among the engine
    processes, so that none spins against another), and, when pinned, the cores of each process (`cpus.plan_cpus`:
    decode workers on theirs, with kvtransfer beside a one-thread decode worker, everything else sharing the rest)."""

    procs_per_host: int | None  # None: the workers were given their own
    threads: int | None  # the workers' --num-threads when `up` sets it (pinned); None: theirs or the default
    pinned: CpuPlan | None
    batch_wait_given: bool = False  # the workers were given their own --batch-wait-ms
    ep_group: bool = False  # every instance an EP group, whose ranks vote on each step: no batch wait

    @staticmethod
    def for_mesh(args: argparse.Namespace, extra: list[str]) -> HostCores:
        own_procs = _option_value(extra, "--procs-per-host")
        procs = int(own_procs) if own_procs and own_procs.isdigit() and int(own_procs) > 0 \
            else max(1, (args.prefill + args.decode) * args.ep_size)
        given = _option_value(extra, "--num-threads")
        cores = cpus.available_cpus()
        threads = int(given) if given and given.isdigit() else cpus.default_threads(procs, len(cores))
        plan = None
        if args.pin == "auto" and args.device == "cpu" and args.ep_size == 1:
            plan = cpus.plan_cpus(cores, args.decode, threads)
        return HostCores(None if own_procs is not None else procs, threads if plan is not None and not given else None,
                         plan, _option_value(extra, "--batch-wait-ms") is not None, args.ep_size > 1)

    def worker_args(self, role: str, index: int) -> list[str]:
        out = [] if self.procs_per_host is None else ["--procs-per-host", str(self.procs_per_host)]
        if self.pinned is not None and role == "prefill":
            # The prefill worker's long steps share the cores of the gateway, kvtransfer and eplb: at +10 they take
            # the core first (small shape, 64 prompts at concurrency 4, three pairs: p99 TTFT 178/176/192 against
            # 220/202/247 ms, mean TTFT and output tokens/s better or level; docs/benchmarks.md).
            out += ["--engine-nice", str(cpus.SHARED_ENGINE_NICE)]
        if role == "prefill" and not self.batch_wait_given and not self.ep_group:  # EP ranks step in lockstep
            out += ["--batch-wait-ms", str(PREFILL_BATCH_WAIT_MS)]
        return out + (["--num-threads", str(self.threads)] if self.threads is not None else [])

    def env(self, env: dict[str, str], role: str, index: int) -> dict[str, str]:
        if self.pinned is None:
            return env
        cores = self.pinned.decode[index] if role == "decode" else self.pinned.kvtransfer if role == "kvtransfer" \
            else self.pinned.shared
        return {**env, cpus.ENV: cpus.format_cpus(cores)}


def _option_value(argv: list[str], flag: str) -> str | None:
    """The value of `flag` in an argument list (`--flag V` or `--flag=V`), or None."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


@dataclass
class ClientSecurity:
    """How a client (this launcher's own, and the one the table suggests) reaches the gateway."""

    api_key: str | None = None
    tls: dict[str, str] = field(default_factory=dict)  # "ca"/"cert"/"key" -> file
    gateway_env: dict[str, str] = field(default_factory=dict)  # what only the gateway's process gets

    def client_kwargs(self) -> dict[str, str]:
        kw = {f"tls_{name}": path for name, path in self.tls.items()}
        return {**kw, "api_key": self.api_key} if self.api_key else kw


def _security(args: argparse.Namespace, env: dict[str, str]) -> ClientSecurity:
    """Apply --api-key/--api-key-file (to the gateway) and --tls-dir (to `env`, so to every child);
    returns what a client needs. ValueError for a missing certificate file or an empty key list."""
    from moemesh.service.auth import parse_api_keys

    sec = ClientSecurity()
    if args.tls_dir:
        for name, file in TLS_FILES.items():
            path = Path(args.tls_dir, file).resolve()
            if not path.is_file():
                raise ValueError(f"--tls-dir {args.tls_dir}: no {file} (expected {', '.join(TLS_FILES.values())})")
            env[TLS_ENV[name]] = str(path)
    sec.tls = {name: env[var] for name, var in TLS_ENV.items() if env.get(var)}
    if args.api_key or args.api_key_file:
        keys = parse_api_keys(args.api_key, args.api_key_file)
        if not keys:
            raise ValueError("--api-key / --api-key-file given, but no key in them")
        # Through the environment: a command line is readable by every user of the host.
        sec.gateway_env["MOEMESH_API_KEY"] = ",".join(keys)
        sec.api_key = keys[0]
    else:
        inherited = parse_api_keys(env.get("MOEMESH_API_KEY"))
        sec.api_key = inherited[0] if inherited else None
    return sec


def _wait_registered(gateway: str, prefill: int, decode: int, deadline: float,
                     security: ClientSecurity | None = None) -> None:
    from moemesh.sdk import MeshClient, MeshError, UnauthenticatedError

    kw = security.client_kwargs() if security is not None else {}
    with MeshClient(gateway, timeout_s=5, retries=0, **kw) as client:
        while True:
            try:
                models = client.list_models()
                if models and models[0].num_prefill_workers >= prefill and models[0].num_decode_workers >= decode:
                    return
            except UnauthenticatedError as e:  # never right later
                raise RuntimeError(f"the gateway refused this launcher's API key: {e.message}") from None
            except MeshError:
                pass  # the gateway may still be starting
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers did not register with the gateway at {gateway} in time")
            time.sleep(0.1)


def _table(records: list[ServiceRecord], args: argparse.Namespace, security: ClientSecurity | None = None,
           stop_hint: str | None = None) -> str:
    security = security or ClientSecurity()
    mode = "colocated (decode prefills)" if args.prefill == 0 else f"disaggregated, KV over {args.transfer}"
    if args.ep_size > 1:
        mode += f"; EP groups of {args.ep_size} ranks"
    if security.tls:
        mode += "; mutual TLS"
    if security.api_key:
        mode += "; API key required"
    rows = [f"moemesh is up: {mode}", *table_rows(records)]
    gateway = next(r for r in records if r.name == "gateway")
    target = ",".join(r.address for r in records if r.name.startswith("gateway"))
    # Never the key itself in the hint: the table ends up in terminals and logs.
    tls = "".join(f", tls_{name}='{path}'" for name, path in security.tls.items())
    key_note = " (with MOEMESH_API_KEY set)" if security.api_key else ""
    rows.append(f"first request{key_note}: python -c \"from moemesh.sdk import MeshClient; "
                f"print(MeshClient('{target}'{tls}).generate(prompt='Hello', max_tokens=16).text)\"")
    if gateway.http_address:
        auth = " -H \"Authorization: Bearer $MOEMESH_API_KEY\"" if security.api_key else ""
        rows.append(f"or over REST: curl http://{gateway.http_address}/v1/completions{auth} "
                    "-H 'Content-Type: application/json' -d '{\"prompt\": \"Hello\", \"max_tokens\": 16}'")
    rows.append(stop_hint or "Ctrl-C stops everything.")
    return "\n".join(rows)
