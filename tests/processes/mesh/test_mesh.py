"""The mesh as real processes on loopback (`moemesh up`): outputs equal the in-process engine's."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moemesh.engine.engine import Engine, EngineConfig
from moemesh.engine.sampling_params import SamplingParams
from moemesh.model.default import default_model_dir
from moemesh.sdk import MeshClient
from moemesh.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from tests.processes.mesh.launch import start_mesh
from tests.processes.mesh.waits import assert_processes_gone, until

PROMPTS = ["The quick brown fox", "Once upon a time there was a mesh of services that",
           "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30", "Hi"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    """Greedy tokens from `moemesh generate`'s engine, in this process."""
    engine = Engine(EngineConfig(model=str(default_model_dir()), kv_cache_mb=64))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return [c.token_ids for c in engine.generate(PROMPTS, params)]


def _generate_all(gateway: str, concurrency: int = 4) -> list[list[int]]:
    with MeshClient(gateway, timeout_s=120) as client, cf.ThreadPoolExecutor(concurrency) as pool:
        futs = [pool.submit(client.generate, prompt=p, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
                for p in PROMPTS]
        return [f.result().token_ids for f in futs]


@pytest.mark.parametrize("args", [
    ("--prefill", "2", "--decode", "2", "--transfer", "relay"),
    ("--prefill", "1", "--decode", "1", "--transfer", "ucx"),
    ("--prefill", "2", "--decode", "2", "--transfer", "tcp"),
    ("--prefill", "0", "--decode", "1"),
], ids=["pd-relay-2x2", "pd-ucx-1x1", "pd-tcp-2x2", "colocated"])
def test_mesh_outputs_equal_in_process(args: tuple[str, ...], reference: list[list[int]]) -> None:
    mesh = start_mesh(*args)
    try:
        assert _generate_all(mesh.gateway) == reference
        # Several requests in flight at once, repeated: every one completes with the same tokens.
        assert _generate_all(mesh.gateway, concurrency=8) == reference
    finally:
        mesh.stop()
    assert mesh.proc.returncode == 0
    assert_processes_gone(mesh)


def _requests_ended(metrics_address: str, role: str, outcome: str) -> float:
    """A service's `moemesh_requests_total{role, outcome}` from its /metrics."""
    body = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5).read().decode()
    return sum(sample.value for family in text_string_to_metric_families(body) for sample in family.samples
               if sample.name == "moemesh_requests_total"
               and sample.labels == {"role": role, "outcome": outcome})


def test_cancelled_request_frees_pages_and_dead_worker_is_avoided() -> None:
    mesh = start_mesh("--prefill", "1", "--decode", "2", "--transfer", "relay")
    try:
        prefills = {addr for name, (addr, _) in mesh.services.items() if name.startswith("prefill")}
        workers = [addr for name, (addr, _) in mesh.services.items() if name.startswith(("decode", "prefill"))]
        with MeshClient(mesh.gateway, timeout_s=60) as client:
            stream = client.stream(prompt="Cancel me " * 20, max_tokens=400, temperature=0, ignore_eos=True)
            next(iter(stream))
            stream.close()  # leaving the stream cancels the request everywhere
            for addr in workers:  # both sides give their pages back (nothing held; cache pages count as free)
                with grpc.insecure_channel(addr) as ch:
                    stub = prefill_pb2_grpc.PrefillStub(ch) if addr in prefills else decode_pb2_grpc.DecodeStub(ch)
                    until(lambda stub=stub: stub.GetLoad(common_pb2.GetLoadRequest(), timeout=10),
                          lambda load: load.num_running_requests == load.num_waiting_requests == 0
                          and load.num_free_pages == load.num_total_pages, 30, f"{addr} idle after the cancel")
            # ...because the request was cancelled, not because its 400 tokens were done.
            decodes = [address for name, address in mesh.metrics.items() if name.startswith("decode")]
            until(lambda: sum(_requests_ended(address, "decode", "cancelled") for address in decodes),
                  lambda n: n == 1, 30, "the decode worker's cancelled request")
            assert sum(_requests_ended(address, "decode", "length") for address in decodes) == 0
            # Kill one decode worker outright: requests keep completing on the other.
            victim = mesh.services["decode-0"][1]
            os.kill(victim, signal.SIGKILL)
            results = []
            for _ in range(6):
                try:
                    results.append(client.generate(prompt="still there?", max_tokens=4, temperature=0))
                except Exception as e:  # a request routed to the dead worker before it was noticed
                    assert "decode" in str(e).lower() or "unavailable" in str(e).lower(), e
            assert len(results) >= 4 and all(len(r.token_ids) == 4 for r in results)
    finally:
        mesh.stop()
