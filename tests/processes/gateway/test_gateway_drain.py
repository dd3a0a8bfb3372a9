"""SIGTERM drains a gateway process (`moemesh serve gateway`) in front of a real decode worker (the tiny model,
colocated): its REST /health and gRPC health fail at once and new calls get 503, while the streams it already
serves run to their end, token for token what an undisturbed gateway sends; then it exits with 0. A second
SIGTERM ends what is left at once, each stream with an error event and [DONE]."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.service.launch import ServiceProcess, start_service
from moemesh.telemetry.readiness import HTTP
from tests.net import free_port
from tests.paths import ROOT
from tests.processes.mesh.waits import until
from tests.service.gateway.rest_doubles import error_of

pytestmark = pytest.mark.timeout(60)

DRAIN_TIMEOUT_S = 30
PROMPTS = ["The gateway drains: ", "Every stream it took ends whole, ", "and only then does it exit: "]
# Long enough that the streams are mid-way at the SIGTERM (several ms a token on the tiny model, three at once),
# short enough for a fast test.
MAX_TOKENS = 200
# Chunks a stream has when the SIGTERM goes.
BEFORE_SIGTERM = 5


@dataclass
class Gateway:
    proc: ServiceProcess
    http: str  # host:port of its REST API
    grpc: str

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"http://{self.http}{path}", trust_env=False, timeout=10)


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    """A gateway process (drain deadline from MOEMESH_DRAIN_TIMEOUT_S) and a decode worker registered with it."""
    env = {**os.environ, "MOEMESH_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S)}
    gw = start_service("gateway", ["--port", "0", "--http-port", "0", "--metrics-port", "-1", "--kvtransfer", ""],
                       env=env, cwd=ROOT, ready_timeout_s=60)
    procs = [gw]
    try:
        running = Gateway(gw, gw.wait_ready(HTTP, timeout_s=30), gw.address)
        # Colocated: no prefill worker, so nothing calls kvtransfer, and nothing listens at its address.
        procs.append(start_service("decode", ["--port", "0", "--metrics-port", "-1", "--gateway", running.grpc,
                                              "--kvtransfer", f"127.0.0.1:{free_port()}", "--eplb", ""],
                                   cwd=ROOT, ready_timeout_s=60))
        until(lambda: running.get("/health").status_code, lambda code: code == 200, 30, "the decode worker ready")
        yield running
    finally:
        for proc in reversed(procs):
            proc.stop()


@dataclass
class Stream:
    """One streamed completion, read by its own thread: its `data:` payloads, JSON-decoded ([DONE] a string)."""

    http: str
    prompt: str
    max_tokens: int = MAX_TOKENS
    events: list[Any] = field(default_factory=list)
    mid_way: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        body = {"prompt": self.prompt, "max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        try:
            with httpx.stream("POST", f"http://{self.http}/v1/completions", json=body, trust_env=False,
                              timeout=60) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line:
                        assert line.startswith("data: "), line
                        data = line.removeprefix("data: ")
                        self.events.append(data if data == "[DONE]" else json.loads(data))
                    if len(self.events) == BEFORE_SIGTERM:
                        self.mid_way.set()
        except BaseException as e:  # reported by `result`
            self.error = e
        finally:
            self.mid_way.set()  # a stream that failed early must not keep the test waiting

    def result(self, timeout_s: float = 45) -> list[Any]:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"the stream of {self.prompt!r} did not end in {timeout_s} s"
        if self.error is not None:
            raise self.error
        return self.events

    @property
    def text(self) -> str:
        return "".join(c["text"] for e in self.events if isinstance(e, dict) for c in e.get("choices", []))


def _wait_mid_way(streams: list[Stream]) -> None:
    for s in streams:
        assert s.mid_way.wait(30), f"no output for {s.prompt!r}"
        assert s.error is None, s.error


def _exit_code(gw: Gateway, timeout_s: float) -> int:
    code = gw.proc.wait(timeout_s)
    gw.proc.output.join(5)  # every line it wrote, read
    return code


def _logged(gw: Gateway, text: str) -> bool:
    return any(text in line for line in gw.proc.output.lines)


def _sigterm_until_draining(gw: Gateway) -> float:
    """SIGTERM the gateway and wait until its /health stops saying ok; the time the signal went."""
    sent = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)

    def health() -> Any:
        try:
            return gw.get("/health")
        except httpx.TransportError as e:  # a closed listener fails the test below, with what it saw
            return e

    seen = until(health, lambda r: not isinstance(r, httpx.Response) or r.status_code != 200, 15,
                 "/health answering something else than 200 after SIGTERM")
    assert isinstance(seen, httpx.Response), f"/health during the drain: {seen!r}"
    assert (seen.status_code, seen.json()["status"]) == (503, "draining")
    return sent


def test_sigterm_lets_open_streams_finish_and_refuses_new_calls(gateway: Gateway) -> None:
    reference = [Stream(gateway.http, p) for p in PROMPTS]  # the same calls, undisturbed
    reference_events = [s.result() for s in reference]
    assert all(e[-1] == "[DONE]" for e in reference_events)

    streams = [Stream(gateway.http, p) for p in PROMPTS]
    _wait_mid_way(streams)
    sent = _sigterm_until_draining(gateway)

    refused = httpx.post(f"http://{gateway.http}/v1/completions", json={"prompt": "late", "max_tokens": 4},
                         trust_env=False, timeout=10)
    error = error_of(refused, 503)
    assert (error["type"], error["code"]) == ("service_unavailable_error", "unavailable"), error
    assert "shutting down" in error["message"] and refused.headers["connection"] == "close"
    with grpc.insecure_channel(gateway.grpc) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING

    for stream, ref in zip(streams, reference, strict=True):
        events = stream.result()
        assert events[-1] == "[DONE]" and not [e for e in events if isinstance(e, dict) and "error" in e], events[-3:]
        assert [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]] == ["length"]
        assert events[-2]["usage"]["completion_tokens"] == MAX_TOKENS
        assert stream.text == ref.text, stream.prompt
    assert _exit_code(gateway, DRAIN_TIMEOUT_S) == 0
    assert time.monotonic() - sent < DRAIN_TIMEOUT_S
    # What the drain found: every stream still open (so each one above was served through it), and no deadline.
    assert _logged(gateway, f"draining: {len(PROMPTS)} requests in flight get up to {DRAIN_TIMEOUT_S} s")
    assert not _logged(gateway, "ending them")


def test_a_second_sigterm_ends_the_drain_at_once(gateway: Gateway) -> None:
    # Far more tokens than the test waits for: only the second signal can end these streams in time.
    streams = [Stream(gateway.http, p, max_tokens=3000) for p in PROMPTS[:2]]
    _wait_mid_way(streams)
    _sigterm_until_draining(gateway)
    again = time.monotonic()
    gateway.proc.send_signal(signal.SIGTERM)
    for stream in streams:
        events = stream.result(timeout_s=15)
        assert events[-1] == "[DONE]" and "shutting down" in events[-2]["error"]["message"], events[-2:]
        assert len(events) - 2 < 3000  # cut short
    assert _exit_code(gateway, 15) == 0
    assert time.monotonic() - again < 10
    assert _logged(gateway, "stopping at once with 2 requests in flight: ending them")
