"""Faults with real processes: a worker killed with SIGKILL mid-request, kvtransfer or eplb gone, the gateway
restarted. The client's greedy output is the undisturbed run's, token for token, and the survivors' KV page
counts return to idle."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import urllib.request

import grpc
import pytest

from moemesh.engine.engine import Engine, EngineConfig
from moemesh.engine.sampling_params import SamplingParams
from moemesh.model.default import default_model_dir
from moemesh.sdk import MeshClient
from moemesh.service.launch import ServiceProcess, start_service
from moemesh.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from tests.net import free_port
from tests.processes.mesh.launch import ROOT, RunningMesh, start_mesh
from tests.processes.mesh.waits import migrations

PROMPT = "The mesh keeps every request it takes, even when the worker serving it dies: "
LONG_PROMPT = " ".join(str(i) for i in range(400))
MAX_TOKENS = 80


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[list[int], str]]:
    engine = Engine(EngineConfig(model=str(default_model_dir()), kv_cache_mb=64))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return {p: (c.token_ids, c.text) for p, c in zip((PROMPT, LONG_PROMPT), engine.generate([PROMPT, LONG_PROMPT],
                                                                                            params), strict=True)}


def _load(addr: str, prefill: bool) -> common_pb2.WorkerLoad:
    with grpc.insecure_channel(addr) as ch:
        stub = prefill_pb2_grpc.PrefillStub(ch) if prefill else decode_pb2_grpc.DecodeStub(ch)
        return stub.GetLoad(common_pb2.GetLoadRequest(), timeout=10)


def _workers(mesh: RunningMesh, role: str) -> dict[str, tuple[str, int]]:
    return {name: v for name, v in mesh.services.items() if name.startswith(role)}


def _busy(mesh: RunningMesh, role: str, deadline_s: float = 30) -> str:
    """The name of the `role` worker that has a request in hand (running or waiting)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        for name, (addr, _) in _workers(mesh, role).items():
            load = _load(addr, role == "prefill")
            if load.num_running_requests or load.num_waiting_requests:
                return name
        time.sleep(0.02)
    raise AssertionError(f"no {role} worker took the request")


def _assert_idle(mesh: RunningMesh, dead: set[str], deadline_s: float = 15) -> None:
    """Every surviving worker holds no request and no page (cached pages count as free)."""
    end = time.monotonic() + deadline_s
    for name, (addr, _) in {**_workers(mesh, "prefill"), **_workers(mesh, "decode")}.items():
        if name in dead:
            continue
        while True:
            load = _load(addr, name.startswith("prefill"))
            idle = load.num_running_requests == 0 and load.num_waiting_requests == 0 \
                and load.num_free_pages == load.num_total_pages
            if idle:
                break
            assert time.monotonic() < end, f"{name} is not idle: {load}"
            time.sleep(0.1)


# Long enough that the worker is still generating when the kill lands (a few ms a token on the tiny model).
MIGRATED_TOKENS = 300


@pytest.fixture(scope="module")
def long_reference() -> tuple[list[int], str]:
    engine = Engine(EngineConfig(model=str(default_model_dir()), kv_cache_mb=64))
    params = SamplingParams(max_tokens=MIGRATED_TOKENS, temperature=0, ignore_eos=True)
    out = engine.generate([PROMPT], params)[0]
    return out.token_ids, out.text


@pytest.mark.parametrize("args", [
    ("--prefill", "1", "--decode", "2", "--transfer", "relay"),
    ("--prefill", "0", "--decode", "2"),
], ids=["pd", "colocated"])
def test_decode_killed_mid_stream_the_request_continues(args: tuple[str, ...],
                                                        long_reference: tuple[list[int], str]) -> None:
    mesh = start_mesh(*args)
    try:
        before = migrations(mesh)
        with MeshClient(mesh.gateway, timeout_s=120) as client:
            tokens, text, finish = [], "", None
            killed, tokens_at_kill = None, None
            for chunk in client.stream(prompt=PROMPT, max_tokens=MIGRATED_TOKENS, temperature=0, ignore_eos=True):
                tokens += chunk.token_ids
                text += chunk.text
                finish = chunk.finish_reason or finish
                if killed is None and len(tokens) >= 10 and not chunk.finish_reason:
                    killed = _busy(mesh, "decode")
                    os.kill(mesh.services[killed][1], signal.SIGKILL)
                    tokens_at_kill = len(tokens)
        assert killed is not None
        # The kill came before the last token, and the gateway moved the request once to the other worker
        # (a worker that had sent every token before it died would leave nothing to migrate).
        assert tokens_at_kill < MIGRATED_TOKENS
        assert migrations(mesh) - before == 1
        assert (tokens, text) == long_reference  # nothing repeated, nothing missing
        assert finish == "length"
        _assert_idle(mesh, {killed})
    finally:
        mesh.stop()


def test_prefill_killed_mid_prompt_the_request_is_served(reference: dict[str, tuple[list[int], str]]) -> None:
    # Small prefill chunks: the prompt takes many steps, so the kill lands mid-prompt.
    mesh = start_mesh("--prefill", "2", "--decode", "1", "--transfer", "relay", "--",
                      "--max-num-batched-tokens", "16")
    try:
        with MeshClient(mesh.gateway, timeout_s=120) as client:
            stream = client.stream(prompt=LONG_PROMPT, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
            victim = None
            tokens, text = [], ""

            def kill_when_busy() -> None:
                nonlocal victim
                victim = _busy(mesh, "prefill")
                os.kill(mesh.services[victim][1], signal.SIGKILL)

            killer = threading.Thread(target=kill_when_busy)
            killer.start()
            for chunk in stream:
                tokens += chunk.token_ids
                text += chunk.text
            killer.join()
        assert victim is not None
        assert (tokens, text) == reference[LONG_PROMPT]
        _assert_idle(mesh, {victim})
    finally:
        mesh.stop()


def test_kvtransfer_killed_requests_run_colocated(reference: dict[str, tuple[list[int], str]]) -> None:
    mesh = start_mesh("--prefill", "1", "--decode", "1", "--transfer", "relay")
    try:
        os.kill(mesh.services["kvtransfer"][1], signal.SIGKILL)
        with MeshClient(mesh.gateway, timeout_s=60) as client:
            for _ in range(2):
                out = client.generate(prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
                assert (out.token_ids, out.text) == reference[PROMPT]
        assert mesh.proc.poll() is None, "moemesh up stopped when kvtransfer died"
        body = urllib.request.urlopen(f"http://{mesh.metrics['gateway']}/metrics", timeout=5).read().decode()
        assert "moemesh_gateway_pd_fallback 1.0" in body
        _assert_idle(mesh, set())
    finally:
        mesh.stop()


def test_eplb_killed_serving_goes_on() -> None:
    mesh = start_mesh("--prefill", "0", "--decode", "1")
    try:
        os.kill(mesh.services["eplb"][1], signal.SIGKILL)
        time.sleep(1)
        assert mesh.proc.poll() is None, "moemesh up stopped when eplb died"
        with MeshClient(mesh.gateway, timeout_s=60) as client:
            for _ in range(3):
                assert len(client.generate(prompt=PROMPT, max_tokens=8, temperature=0).token_ids) == 8
        _assert_idle(mesh, set())
    finally:
        mesh.stop()


def _serve(service: str, *args: str) -> ServiceProcess:
    """`moemesh serve SERVICE ARGS`, not waited for (see `_listening`); its output drained by a thread."""
    return start_service(service, args, cwd=ROOT, stderr=subprocess.DEVNULL, ready_timeout_s=None)


def _listening(proc: ServiceProcess, timeout_s: float = 120) -> str:
    """The address of its "SERVICE listening on ADDR" line (AssertionError, with its output, if none comes)."""
    try:
        return proc.wait_ready(timeout_s=timeout_s)
    except (RuntimeError, TimeoutError) as e:
        raise AssertionError(str(e)) from None


def test_gateway_restart_workers_register_again() -> None:
    port = free_port()
    procs = []
    try:
        kv = _serve("kvtransfer", "--port", "0", "--metrics-port", "-1")
        procs.append(kv)
        kv_addr = _listening(kv)
        gw = _serve("gateway", "--port", str(port), "--http-port", "-1", "--metrics-port", "-1")
        procs.append(gw)
        gateway = _listening(gw)
        worker = _serve("decode", "--port", "0", "--metrics-port", "-1", "--gateway", gateway, "--kvtransfer",
                        kv_addr, "--eplb", "")
        procs.append(worker)
        worker_addr = _listening(worker)
        with MeshClient(gateway, timeout_s=60, retries=0) as client:
            _until(lambda: client.list_models()[0].num_decode_workers == 1)
            assert len(client.generate(prompt=PROMPT, max_tokens=4, temperature=0).token_ids) == 4
        gw.kill()
        gw.wait()
        gw2 = _serve("gateway", "--port", str(port), "--http-port", "-1", "--metrics-port", "-1")
        procs.append(gw2)
        _listening(gw2)
        with MeshClient(gateway, timeout_s=60, retries=0) as client:
            # The worker notices (its heartbeat is refused, then unknown) and registers by itself.
            _until(lambda: client.list_models()[0].num_decode_workers == 1)
            assert len(client.generate(prompt=PROMPT, max_tokens=4, temperature=0).token_ids) == 4
        load = _load(worker_addr, prefill=False)
        assert load.num_running_requests == 0 and load.num_free_pages == load.num_total_pages
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def _until(check, timeout_s: float = 30) -> None:
    end = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except Exception:
            if time.monotonic() > end:
                raise
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)

