"""Gateway replicas (`moemesh up --gateways 2`): every worker registers with each; SDK streams whose gateway is
killed (SIGKILL) mid-way go on at another, token for token as an undisturbed run, nothing repeated or missing; a
gateway sent SIGTERM finishes its open REST streams while new requests go to the others; a client whose gateways
are all gone gets one clear error."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import httpx
import pytest

from moemesh.sdk import AsyncMeshClient, MeshClient, UnavailableError
from moemesh.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from tests.net import free_port
from tests.processes.gateway.test_gateway_drain import Stream
from tests.processes.mesh.launch import RunningMesh, running_mesh
from tests.processes.mesh.waits import until

STREAMS = 8
MAX_TOKENS = 240  # long enough that every stream is mid-way when the kill lands (ms a token on the tiny model)
PROMPTS = [f"Replica {i} of the gateway may die; the stream must not notice: " for i in range(STREAMS)]
# Greedy streams and seeded sampled ones: both must continue exactly where they broke.
SAMPLING = [dict(temperature=0.0) if i % 2 == 0 else dict(temperature=1.0, top_p=0.9, seed=100 + i)
            for i in range(STREAMS)]


@pytest.fixture(scope="module")
def mesh():
    with running_mesh("--gateways", "2", "--prefill", "1", "--decode", "1") as running:
        yield running


@pytest.fixture
def fresh_mesh():
    """A mesh of its own, for a test that takes a gateway away."""
    with running_mesh("--gateways", "2", "--prefill", "1", "--decode", "1") as running:
        yield running


def _targets(mesh: RunningMesh) -> list[str]:
    return [mesh.services["gateway"][0], mesh.services["gateway-1"][0]]


async def _streams(targets: list[str], on_progress=None) -> list[tuple[list[int], str, str | None]]:
    """STREAMS concurrent streams, each from its own client given `targets` (so each starts at the first);
    `on_progress(counts)` is called with every stream's token count as chunks arrive."""
    counts = [0] * STREAMS

    async def one(i: int) -> tuple[list[int], str, str | None]:
        tokens: list[int] = []
        text, finish = "", None
        async with AsyncMeshClient(targets, timeout_s=120) as client:
            async for chunk in client.stream(PROMPTS[i], max_tokens=MAX_TOKENS, ignore_eos=True, **SAMPLING[i]):
                tokens += chunk.token_ids
                text += chunk.text
                finish = chunk.finish_reason or finish
                counts[i] = len(tokens)
                if on_progress is not None:
                    on_progress(counts)
        return tokens, text, finish

    return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(STREAMS))), 180)


def _load(address: str, prefill: bool) -> common_pb2.WorkerLoad:
    with grpc.insecure_channel(address) as ch:
        stub = prefill_pb2_grpc.PrefillStub(ch) if prefill else decode_pb2_grpc.DecodeStub(ch)
        return stub.GetLoad(common_pb2.GetLoadRequest(), timeout=10)


def _idle(mesh: RunningMesh) -> list[tuple[str, int, int, int]]:
    """(worker, running, waiting, pages held) for every worker that still holds something."""
    busy = []
    for name, (address, _) in mesh.services.items():
        if name.startswith(("prefill", "decode")) and not name.endswith("-http"):
            load = _load(address, name.startswith("prefill"))
            held = load.num_total_pages - load.num_free_pages
            if load.num_running_requests or load.num_waiting_requests or held:
                busy.append((name, load.num_running_requests, load.num_waiting_requests, held))
    return busy


def test_every_worker_registers_with_every_gateway(mesh: RunningMesh) -> None:
    for target in _targets(mesh):
        with MeshClient(target, timeout_s=30) as client:
            (model,) = client.list_models()
            assert (model.num_prefill_workers, model.num_decode_workers) == (1, 1), target


def test_streams_of_a_killed_gateway_continue_at_the_other_token_for_token(mesh: RunningMesh) -> None:
    targets = _targets(mesh)
    undisturbed = asyncio.run(_streams(targets))
    assert all(len(t) == MAX_TOKENS and f == "length" for t, _, f in undisturbed)

    killed_at: list[list[int]] = []

    def kill_when_all_are_mid_way(counts: list[int]) -> None:
        if not killed_at and min(counts) >= 10:
            os.kill(mesh.services["gateway"][1], signal.SIGKILL)
            killed_at.append(list(counts))

    disturbed = asyncio.run(_streams(targets, kill_when_all_are_mid_way))
    assert killed_at, "the streams ended before every one had 10 tokens"
    assert max(killed_at[0]) < MAX_TOKENS  # every stream was mid-way when its gateway died
    for i, (got, want) in enumerate(zip(disturbed, undisturbed, strict=True)):
        assert got == want, f"stream {i} (killed at {killed_at[0][i]} tokens) differs from the undisturbed run"
    # The dead gateway's requests were cancelled on the workers, the resumed ones finished: nothing is held.
    until(lambda: _idle(mesh), lambda busy: busy == [], 30, "workers idle after the gateway's death")
    # The survivor keeps serving new requests, and `moemesh up` keeps running with one gateway left.
    with MeshClient(targets, timeout_s=60) as client:
        assert len(client.generate("still here", max_tokens=4, temperature=0).token_ids) == 4
    assert mesh.proc.poll() is None
    # `moemesh up` starts the dead gateway again on its port, and the workers register with it again.
    with MeshClient(targets[0], timeout_s=5, retries=0) as client:
        until(lambda: _registered(client), lambda n: n == (1, 1), 60, "the workers at the restarted gateway")
        assert len(client.generate("back again", max_tokens=4, temperature=0).token_ids) == 4


def _registered(client: MeshClient) -> tuple[int, int] | str:
    try:
        (model,) = client.list_models()
    except UnavailableError as e:  # not listening yet
        return e.message
    return model.num_prefill_workers, model.num_decode_workers


def test_a_draining_gateway_finishes_its_rest_streams_while_new_requests_go_to_another(fresh_mesh: RunningMesh
                                                                                         ) -> None:
    mesh = fresh_mesh
    draining, other = mesh.services["gateway-1"], mesh.services["gateway"]
    http = mesh.services["gateway-1-http"][0]
    prompts = ["One gateway leaves, ", "its streams end whole, ", "the others take the rest: "]
    streams = [Stream(http, p) for p in prompts]
    for s in streams:
        assert s.mid_way.wait(30) and s.error is None, s.error
    os.kill(draining[1], signal.SIGTERM)
    health = until(lambda: httpx.get(f"http://{http}/health", trust_env=False, timeout=10),
                   lambda r: r.status_code != 200, 15, "/health failing after SIGTERM")
    assert health.status_code == 503
    # A client given both: the draining gateway refuses (UNAVAILABLE, before any token), the other one serves.
    with MeshClient([draining[0], other[0]], timeout_s=60) as client:
        assert len(client.generate("a new request", max_tokens=4, temperature=0).token_ids) == 4
    undisturbed = [Stream(mesh.services["gateway-http"][0], p) for p in prompts]
    for stream, ref in zip(streams, undisturbed, strict=True):
        events, ref_events = stream.result(), ref.result()
        assert events[-1] == "[DONE]" and not [e for e in events if isinstance(e, dict) and "error" in e]
        assert stream.text == ref.text and len(ref_events) > 2
    until(lambda: draining[1] in mesh.alive_pids(), lambda alive: not alive, 30, "the drained gateway gone")
    assert mesh.proc.poll() is None  # the mesh serves on with the others


def test_a_client_whose_gateways_are_all_gone_gets_one_clear_error() -> None:
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    start = time.monotonic()
    with MeshClient(dead, timeout_s=30, retries=2) as client, pytest.raises(UnavailableError) as info:
        client.generate("anyone?", max_tokens=4)
    assert time.monotonic() - start < 20
    for address in dead:
        assert address in info.value.message
    assert "no gateway answered in 3 tries" in info.value.message
