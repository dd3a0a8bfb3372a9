"""Readiness: the lines a moemesh process prints on stdout once it serves, and the one reader of them.

A service prints, each line in one write(2), once the part it names answers:

    kvtransfer listening on 127.0.0.1:50061      its gRPC API (every service, every EP rank)
    gateway http listening on 127.0.0.1:8000     the gateway's REST API
    decode metrics on 127.0.0.1:9103             its Prometheus /metrics

They are for people and scripts alike, so they stay plain text; programs read them through
`parse_line` only (and `LineReader`, which hands over whole lines of output read in pieces), never
with a pattern of their own. `moemesh up` prints a table of its processes for people and, with
`--ready-file PATH`, writes the same records as JSON (`write_ready_file` / `read_ready_file`) for
programs: its stdout carries the services' logs too, which a table parser would have to skip.

Torch-free and dependency-free: the gateway, the SDK-side tools and every launcher import it.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

GRPC = "grpc"
HTTP = "http"
METRICS = "metrics"
KINDS = (GRPC, HTTP, METRICS)

_NAME = r"[A-Za-z][\w-]*"
_ADDRESS = r"\S*:\d+"  # host:port (an IPv6 host in brackets; no host: every interface)
_LINES = {
    GRPC: ("{service} listening on {address}", re.compile(rf"({_NAME}) listening on ({_ADDRESS})")),
    HTTP: ("{service} http listening on {address}", re.compile(rf"({_NAME}) http listening on ({_ADDRESS})")),
    METRICS: ("{service} metrics on {address}", re.compile(rf"({_NAME}) metrics on ({_ADDRESS})")),
}


@dataclass(frozen=True)
class Ready:
    """One readiness line: `service` ("decode") serves `kind` (GRPC, HTTP or METRICS) at `address` (host:port)."""

    service: str
    kind: str
    address: str


def ready_line(service: str, address: str, kind: str = GRPC) -> str:
    """The line (without its newline) saying `service` serves `kind` at `address`.

    Raises ValueError for an unknown kind, a service name that is not one word, or an address that is
    not host:port: a line the readers could not parse back must never be printed.
    """
    if kind not in _LINES:
        raise ValueError(f"unknown readiness kind {kind!r}; one of {', '.join(KINDS)}")
    line = _LINES[kind][0].format(service=service, address=address)
    if parse_line(line) != Ready(service, kind, address):
        raise ValueError(f"not a readiness line: {line!r} (service: one word; address: host:port)")
    return line


def parse_line(line: str) -> Ready | None:
    """The readiness line `line` is (surrounding whitespace and the newline ignored), or None for any other
    line (a log line, a table row, a readiness line with something glued to it)."""
    text = line.strip()
    for kind, (_, pattern) in _LINES.items():
        m = pattern.fullmatch(text)
        if m:
            return Ready(m.group(1), kind, m.group(2))
    return None


def parse_text(text: str) -> list[Ready]:
    """Every readiness line of `text` (captured output), in order; an unterminated last line is left out,
    since its writer may not have finished it."""
    reader = LineReader()
    return [r for r in map(parse_line, reader.feed(text.encode())) if r is not None]


def write_line(line: str) -> None:
    """Print `line` to stdout in one write(2).

    `print` writes the text and its newline separately when stdout is unbuffered (PYTHONUNBUFFERED, -u),
    so two EP ranks sharing their launcher's stdout could interleave into one unparseable line; a single
    write of at most PIPE_BUF bytes to a pipe is atomic.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class LineReader:
    """Whole lines out of output read in pieces: a pipe returns what it has, half a line or three lines.

    Bytes in, lines out (without their newline, decoded as UTF-8 even when a character is split between
    reads); the piece after the last newline waits for the next `feed`.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""

    def feed(self, data: bytes) -> list[str]:
        *lines, self._partial = (self._partial + self._decoder.decode(data)).split("\n")
        return [line.removesuffix("\r") for line in lines]

    def close(self) -> str:
        """What followed the last newline (a line its writer never finished); "" when the output ended cleanly."""
        rest, self._partial = self._partial + self._decoder.decode(b"", final=True), ""
        return rest


# ---- the mesh: `moemesh up`'s table and its --ready-file ------------------------------------------------------


@dataclass(frozen=True)
class ServiceRecord:
    """One process of a mesh once it is ready: a row of `moemesh up`'s table, an entry of its ready file."""

    name: str  # "kvtransfer", "gateway", "prefill-0", "decode-1-dp0"
    pid: int
    address: str  # its gRPC API, host:port
    http_address: str = ""  # its REST API ("": none)
    metrics_address: str = ""  # its /metrics ("": none)


READY_FILE_VERSION = 1


def write_ready_file(path: str | Path, records: Iterable[ServiceRecord]) -> None:
    """Write the mesh's records as JSON to `path`, atomically: a reader sees no file or the whole file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    doc = {"version": READY_FILE_VERSION, "services": [asdict(r) for r in records]}
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def read_ready_file(path: str | Path) -> list[ServiceRecord]:
    """The records `write_ready_file` wrote. Raises OSError (no file) or ValueError (not such a file)."""
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or doc.get("version") != READY_FILE_VERSION:
        raise ValueError(f"{path}: not a moemesh ready file of version {READY_FILE_VERSION}")
    names = {f.name for f in fields(ServiceRecord)}
    try:
        return [ServiceRecord(**{k: v for k, v in entry.items() if k in names}) for entry in doc["services"]]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: malformed service entry ({e})") from None


def table_rows(records: Iterable[ServiceRecord]) -> list[str]:
    """`moemesh up`'s table for people: a header, then one row per address (gRPC, -http, -metrics)."""
    rows = [f"  {'service':<14} {'address':<22} pid"]
    for r in records:
        rows.append(f"  {r.name:<14} {r.address:<22} {r.pid}")
        if r.http_address:
            rows.append(f"  {r.name + '-http':<14} {r.http_address:<22} {r.pid}")
        if r.metrics_address:
            rows.append(f"  {r.name + '-metrics':<14} {r.metrics_address:<22} {r.pid}")
    return rows
