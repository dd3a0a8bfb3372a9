"""Readiness lines: the format people and deployment docs know, parsed back whole and only whole, and `moemesh
up`'s ready file and table."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from moemesh.telemetry.readiness import (
    GRPC,
    HTTP,
    KINDS,
    METRICS,
    LineReader,
    Ready,
    ServiceRecord,
    parse_line,
    parse_text,
    read_ready_file,
    ready_line,
    table_rows,
    write_line,
    write_ready_file,
)

# The lines as users and the deployment docs know them, for each kind.
KNOWN = {
    GRPC: "kvtransfer listening on 127.0.0.1:50061",
    HTTP: "gateway http listening on 0.0.0.0:8000",
    METRICS: "decode metrics on 10.1.2.3:9103",
}
ADDRESSES = ["127.0.0.1:50051", "[::1]:50051", "decode-0.mesh.svc:9103", ":9101", "0.0.0.0:0"]


def test_the_lines_people_know() -> None:
    assert ready_line("kvtransfer", "127.0.0.1:50061") == KNOWN[GRPC]
    assert ready_line("gateway", "0.0.0.0:8000", HTTP) == KNOWN[HTTP]
    assert ready_line("decode", "10.1.2.3:9103", METRICS) == KNOWN[METRICS]
    assert parse_line(KNOWN[GRPC]) == Ready("kvtransfer", GRPC, "127.0.0.1:50061")
    assert parse_line(KNOWN[HTTP]) == Ready("gateway", HTTP, "0.0.0.0:8000")
    assert parse_line(KNOWN[METRICS]) == Ready("decode", METRICS, "10.1.2.3:9103")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("address", ADDRESSES)
@pytest.mark.parametrize("service", ["gateway", "decode", "fake-decode", "eplb_2"])
def test_round_trip(service: str, address: str, kind: str) -> None:
    line = ready_line(service, address, kind)
    assert parse_line(line) == Ready(service, kind, address)
    assert parse_line(line + "\n") == parse_line(f"  {line}\r\n") == Ready(service, kind, address)


def test_a_service_called_http_is_still_a_grpc_line() -> None:
    assert parse_line("http listening on h:1") == Ready("http", GRPC, "h:1")
    assert parse_line("http http listening on h:1") == Ready("http", HTTP, "h:1")


@pytest.mark.parametrize(("service", "address", "kind"), [
    ("fake decode", "h:1", GRPC),  # two words: the reader could not tell the name from the kind
    ("", "h:1", GRPC),
    ("decode", "h", GRPC),  # no port
    ("decode", "h:", GRPC),
    ("decode", "h 1:2", GRPC),
    ("decode", "h:1", "udp"),
])
def test_lines_that_could_not_be_read_back_are_refused(service: str, address: str, kind: str) -> None:
    with pytest.raises(ValueError):
        ready_line(service, address, kind)


@pytest.mark.parametrize("line", [
    "2025-01-01T00:00:00 [info     ] decode listening on 127.0.0.1:5",  # a console log line
    '{"event": "decode metrics on 127.0.0.1:9103", "level": "info"}',  # a JSON log line
    "decode listening on 127.0.0.1:50051 decode listening on 127.0.0.1:50052",  # two lines glued together
    "Tdecode listening on 127.0.0.1:50051 trailing",
    "  decode-0       127.0.0.1:50051        4242",  # a row of `moemesh up`'s table
    "decode listening on 127.0.0.1:",  # cut short
    "decode listening on 127.0.0.1",
    "decode listening at 127.0.0.1:1",
    "decode  listening on 127.0.0.1:1",
    "",
])
def test_other_lines_are_not_readiness_lines(line: str) -> None:
    assert parse_line(line) is None


# Readiness lines among log output, one of them cut in the middle by the end of a read.
OUTPUT = ("INFO loading the model\n"
          "kvtransfer listening on 127.0.0.1:50061\n"
          "WARNING metrics port 9104 is taken; serving metrics on a free port instead\n"
          "kvtransfer metrics on 127.0.0.1:41234\n"
          "INFO caf\u00e9 served\n"
          "gateway http listening on 127.0.0.1:8000\n").encode()
EXPECTED = [Ready("kvtransfer", GRPC, "127.0.0.1:50061"), Ready("kvtransfer", METRICS, "127.0.0.1:41234"),
            Ready("gateway", HTTP, "127.0.0.1:8000")]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, len(OUTPUT)])
def test_line_reader_gives_whole_lines_whatever_the_reads(size: int) -> None:
    reader = LineReader()
    lines = [line for i in range(0, len(OUTPUT), size) for line in reader.feed(OUTPUT[i:i + size])]
    assert lines == OUTPUT.decode().splitlines()  # the two-byte character too, whatever read cut it
    assert reader.close() == ""
    assert [r for r in map(parse_line, lines) if r] == EXPECTED


def test_a_line_cut_by_a_read_is_not_read_until_it_ends() -> None:
    reader = LineReader()
    # The writer's line so far would parse, with the wrong port: it must not be handed over yet.
    assert reader.feed(b"log\ndecode listening on 127.0.0.1:5005") == ["log"]
    assert reader.feed(b"1\r\n") == ["decode listening on 127.0.0.1:50051"]
    assert reader.feed(b"decode metrics on 127.0.0.1:9") == []
    assert reader.close() == "decode metrics on 127.0.0.1:9"  # never finished: the caller drops it
    assert reader.close() == ""


def test_parse_text_reads_captured_output_and_leaves_an_unfinished_line_out() -> None:
    assert parse_text(OUTPUT.decode()) == EXPECTED
    assert parse_text(OUTPUT.decode() + "decode listening on 127.0.0.1:1") == EXPECTED
    assert parse_text("") == []


def test_write_line_is_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[str] = []

    class Recorder(io.StringIO):
        def write(self, s: str) -> int:
            writes.append(s)
            return len(s)

    monkeypatch.setattr(sys, "stdout", Recorder())
    write_line(KNOWN[GRPC])
    assert writes == [KNOWN[GRPC] + "\n"]  # text and newline together: one write(2) on an unbuffered pipe


RECORDS = [
    ServiceRecord("kvtransfer", 101, "127.0.0.1:50061", metrics_address="127.0.0.1:9104"),
    ServiceRecord("gateway", 102, "127.0.0.1:50051", "127.0.0.1:8000", "127.0.0.1:9101"),
    ServiceRecord("decode-0-dp1", 103, "[::1]:40000"),
]


def test_ready_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ready.json"
    write_ready_file(path, RECORDS)
    assert read_ready_file(path) == RECORDS
    assert [p.name for p in tmp_path.iterdir()] == ["ready.json"]  # the temporary file was renamed, not left
    doc = json.loads(path.read_text())
    assert doc["services"][1] == {"name": "gateway", "pid": 102, "address": "127.0.0.1:50051",
                                  "http_address": "127.0.0.1:8000", "metrics_address": "127.0.0.1:9101"}
    write_ready_file(path, RECORDS[:1])  # replaced whole
    assert read_ready_file(path) == RECORDS[:1]


def test_ready_file_refusals(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        read_ready_file(tmp_path / "none.json")
    (tmp_path / "other.json").write_text(json.dumps({"version": 99, "services": []}))
    with pytest.raises(ValueError, match="version 1"):
        read_ready_file(tmp_path / "other.json")
    (tmp_path / "bad.json").write_text(json.dumps({"version": 1, "services": [{"name": "x"}]}))
    with pytest.raises(ValueError, match="malformed"):
        read_ready_file(tmp_path / "bad.json")


def test_table_has_a_row_per_address() -> None:
    header, *rows = table_rows(RECORDS)
    assert header.split() == ["service", "address", "pid"]
    expected = []
    for r in RECORDS:
        expected.append([r.name, r.address, str(r.pid)])
        if r.http_address:
            expected.append([f"{r.name}-http", r.http_address, str(r.pid)])
        if r.metrics_address:
            expected.append([f"{r.name}-metrics", r.metrics_address, str(r.pid)])
    assert [row.split() for row in rows] == expected
    assert all(parse_line(row) is None for row in rows)  # a table row is never taken for a readiness line
