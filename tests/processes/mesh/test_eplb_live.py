"""Live expert rebalancing: an EP-2 group under skewed routing reports its load to the eplb service, gets a
new placement while requests stream, switches without failing or changing any request, and is better
balanced afterwards."""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from safetensors.torch import load_file, save_file

from moemesh.engine.engine import Engine, EngineConfig
from moemesh.engine.sampling_params import SamplingParams
from moemesh.sdk import MeshClient
from moemesh.v1 import common_pb2, eplb_pb2, eplb_pb2_grpc
from tests.conftest import SMALL
from tests.processes.mesh.launch import start_mesh

PROMPTS = [[(5 + 29 * i + 11 * j) % 512 for j in range(4 + 5 * i)] for i in range(6)]
MAX_TOKENS = 12
# Experts 2 and 3 (both on rank 0 of two, neither replicated by the start-up placement) win most routing.
FAVOURED, BIAS = (2, 3), 0.35


@pytest.fixture(scope="module")
def skewed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moemesh.model.tiny import tiny_config, write_checkpoint

    path = write_checkpoint(tmp_path_factory.mktemp("skewed"), tiny_config(**SMALL), seed=11)
    weights = load_file(path / "model.safetensors")
    for name, t in weights.items():
        if name.endswith("e_score_correction_bias"):
            t[list(FAVOURED)] += BIAS
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def reference(skewed_dir: Path) -> list[list[int]]:
    engine = Engine(EngineConfig(model=str(skewed_dir), dtype="float32", kv_cache_mb=32))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return [c.token_ids for c in engine.generate(PROMPTS, params)]


def _mean_balancedness(metrics_addr: str, instance: str) -> float | None:
    body = urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=5).read().decode()
    pattern = r'^moemesh_eplb_mean_balancedness\{instance="' + re.escape(instance) + r'",role="decode"\} (\S+)$'
    m = re.search(pattern, body, re.M)
    return float(m.group(1)) if m else None


def test_live_rebalance_raises_balancedness_and_keeps_outputs(skewed_dir: Path, reference: list[list[int]],
                                                              tmp_path: Path) -> None:
    record = tmp_path / "load.jsonl"
    env = {"MOEMESH_REBALANCE_PERIOD_S": "3", "MOEMESH_REBALANCE_MIN_TOKENS": "300",
           "MOEMESH_BALANCE_WINDOW_S": "60"}
    mesh = start_mesh("--model", str(skewed_dir), "--prefill", "0", "--decode", "1", "--ep-size", "2", "--",
                      "--dtype", "float32", "--kv-cache-mb", "32", "--redundant-experts", "2",
                      "--expert-load-window-s", "0.5", "--record-expert-load", str(record), env=env)
    try:
        metrics = mesh.metrics["eplb"]
        eplb = mesh.services["eplb"][0]
        results: list[tuple[int, list[int]]] = []
        stop = threading.Event()

        def stream_requests() -> None:
            with MeshClient(mesh.gateway, timeout_s=60) as client, cf.ThreadPoolExecutor(3) as pool:
                while not stop.is_set():
                    futs = {i: pool.submit(client.generate, token_ids=p, max_tokens=MAX_TOKENS, temperature=0,
                                           ignore_eos=True) for i, p in enumerate(PROMPTS)}
                    results.extend((i, f.result().token_ids) for i, f in futs.items())

        load = threading.Thread(target=stream_requests)
        load.start()
        try:
            before = placement = None
            deadline = time.monotonic() + 90
            with grpc.insecure_channel(eplb) as ch:
                stub = eplb_pb2_grpc.EplbStub(ch)
                req = eplb_pb2.GetPlacementRequest(instance_id="decode-0", role=common_pb2.WORKER_ROLE_DECODE)
                while time.monotonic() < deadline:
                    try:
                        placement = stub.GetPlacement(req, timeout=5)
                    except grpc.RpcError as e:
                        assert e.code() == grpc.StatusCode.NOT_FOUND  # no report yet
                    if placement is not None and placement.version >= 1:
                        break
                    before = _mean_balancedness(metrics, "decode-0")
                    time.sleep(0.3)
            assert placement is not None and placement.version >= 1, "no new placement was published"
            assert before is not None and before < 0.8, f"the skew did not show: balancedness {before}"
            assert placement.previous_balancedness < placement.expected_balancedness
            assert placement.num_moved_slots > 0
            # After the switch the group reports under the new placement; the balancer measures it again.
            after = None
            while time.monotonic() < deadline:
                time.sleep(0.5)
                after = _mean_balancedness(metrics, "decode-0")
                if after is not None and after > before + 0.1:
                    break
            assert after is not None and after > before + 0.1, f"balancedness {before} -> {after}"
            num_before_stop = len(results)
        finally:
            stop.set()
            load.join(timeout=120)
        # Every request, before, during and after the switch, completed with the undisturbed tokens.
        assert num_before_stop >= 2 * len(PROMPTS)
        for i, tokens in results:
            assert tokens == reference[i], f"prompt {i} changed"
        windows = [json.loads(line) for line in record.read_text().splitlines()]
        assert {w["instance_id"] for w in windows} == {"decode-0"} and {w["rank"] for w in windows} == {0, 1}
    finally:
        mesh.stop()
