#!/usr/bin/env python3
"""`moemesh-healthcheck`: a grpc_health_probe in Python for container health checks.

Calls `grpc.health.v1.Health/Check` on the local service and exits 0 when it answers SERVING, 1 otherwise
(NOT_SERVING while starting or draining, an error, a timeout, nothing listening). Docker reserves exit
code 2, so no other code is used.

It needs only `grpcio` and `grpcio-health-checking` (never moemesh itself), so one image serves every
service: the port comes from `--addr`, else `MOEMESH_PORT`, else the `--port` of the `moemesh serve NAME`
process found in /proc, else that service's default port.

    moemesh-healthcheck                       # the service running in this container
    moemesh-healthcheck --addr decode:50070 --service moemesh.v1.Decode

With mutual TLS on (MOEMESH_TLS_CERT, MOEMESH_TLS_KEY, MOEMESH_TLS_CA all set, as the service itself reads
them) it presents the service's own certificate; the certificate must name 127.0.0.1 (or the --addr host),
or MOEMESH_TLS_SERVER_NAME must give the name it holds.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

# The services' default gRPC ports (tests/unit/deploy/test_deploy.py checks them against the services' parsers).
DEFAULT_PORTS = {"gateway": 50051, "kvtransfer": 50060, "decode": 50070, "prefill": 50080, "eplb": 50090}
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def _serve_command(argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """(service, its options) when `argv` runs `moemesh serve NAME ...`, else None."""
    for i, word in enumerate(argv[:-1]):
        if word == "serve" and argv[i + 1] in DEFAULT_PORTS:
            return argv[i + 1], list(argv[i + 2:])
    return None


def _option(args: Sequence[str], name: str) -> str | None:
    """The value of `--name V` or `--name=V` in `args` (the last one wins, as in argparse)."""
    value = None
    for i, word in enumerate(args):
        if word == name and i + 1 < len(args):
            value = args[i + 1]
        elif word.startswith(name + "="):
            value = word.split("=", 1)[1]
    return value


def _serve_processes(proc_root: Path) -> list[tuple[str, list[str]]]:
    found = []
    for entry in sorted(proc_root.iterdir(), key=lambda p: p.name):
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        cmd = _serve_command([w.decode(errors="replace") for w in raw.split(b"\0") if w])
        if cmd is not None:
            found.append(cmd)
    return found


def find_address(environ: Mapping[str, str], proc_root: Path = Path("/proc")) -> str:
    """host:port of the service in this container (see the module's docstring for the order)."""
    host = environ.get("MOEMESH_HOST", "")
    port = environ.get("MOEMESH_PORT")
    if port is None:
        processes = _serve_processes(proc_root) if proc_root.is_dir() else []
        if not processes:
            raise LookupError("no --addr, no MOEMESH_PORT and no `moemesh serve NAME` process to ask")
        service, args = processes[0]
        port = _option(args, "--port") or str(DEFAULT_PORTS[service])
        host = _option(args, "--host") or host
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _channel(address: str, environ: Mapping[str, str]):  # -> grpc.Channel (grpc is imported lazily)
    import grpc

    files = [environ.get(name) for name in ("MOEMESH_TLS_CA", "MOEMESH_TLS_KEY", "MOEMESH_TLS_CERT")]
    if not all(files):
        return grpc.insecure_channel(address)
    ca, key, cert = (Path(f).read_bytes() for f in files)
    name = environ.get("MOEMESH_TLS_SERVER_NAME")
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, cert), options=options)


def check(address: str, service: str = "", timeout_s: float = 3.0,
          environ: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """(serving, what was seen) for one Health/Check call (over mutual TLS when `environ` says so)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        channel = _channel(address, os.environ if environ is None else environ)
    except OSError as e:
        return False, f"cannot read a TLS file: {e}"
    with channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as e:
            return False, f"{e.code().name}: {e.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moemesh-healthcheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", default=None, help="host:port to check (default: the service in this container)")
    p.add_argument("--service", default="", help="service name to check ('' = the server as a whole)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = p.parse_args(argv)
    try:
        address = args.addr or find_address(os.environ)
    except LookupError as e:
        print(f"moemesh-healthcheck: {e}", file=sys.stderr)
        return 1
    serving, seen = check(address, args.service, args.timeout)
    print(f"{address} {args.service or '(server)'}: {seen}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
