"""Expert parallelism in the real mesh: EP groups of rank processes (`moemesh up --ep-size K`).

Outputs must not depend on the deployment: EP size (one that does not divide the expert count, with
redundant experts), two-batch overlap, a non-trivial expert placement, colocated or PD all give the
in-process engine's greedy tokens, with logprobs within 1e-5 (fp32). A rank that dies fails its group's
requests with a clear error while the rest of the mesh keeps serving.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.engine.engine import Engine, EngineConfig
from moemesh.engine.sampling_params import SamplingParams
from moemesh.ep.placement import ExpertPlacement
from moemesh.sdk import MeshClient, MeshError
from moemesh.v1 import common_pb2, decode_pb2_grpc
from tests.conftest import SMALL
from tests.processes.mesh.launch import RunningMesh, start_mesh
from tests.processes.mesh.waits import assert_processes_gone, migrations, until

# Six experts: EP 4 needs two redundant slots (8 physical), EP 2 divides them.
SIX_EXPERTS = {**SMALL, "n_routed_experts": 6, "n_group": 3, "topk_group": 2}
PROMPTS = [[(7 + 31 * i + 13 * j) % 512 for j in range(3 + 7 * i)] for i in range(8)]
MAX_TOKENS = 10
LONG_TOKENS = 400  # the kill tests' requests: long enough to be mid-stream when the rank dies
FP32 = ("--", "--dtype", "float32", "--kv-cache-mb", "32")


@pytest.fixture(scope="module")
def six_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moemesh.model.tiny import tiny_config, write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("six"), tiny_config(**SIX_EXPERTS), seed=5)


@pytest.fixture(scope="module")
def reference(six_dir: Path) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their logprobs from the in-process engine (one process, no EP)."""
    engine = Engine(EngineConfig(model=str(six_dir), dtype="float32", kv_cache_mb=32))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
    return [(c.token_ids, c.logprobs) for c in engine.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def long_reference(six_dir: Path) -> list[list[int]]:
    """The in-process engine's greedy tokens for the kill tests' long requests."""
    engine = Engine(EngineConfig(model=str(six_dir), dtype="float32", kv_cache_mb=32))
    params = SamplingParams(max_tokens=LONG_TOKENS, temperature=0, ignore_eos=True)
    return [c.token_ids for c in engine.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def placement_file(six_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EP 4 over 8 slots: experts shuffled differently in every layer, two of them replicated."""
    rows = []
    for layer in range(2):  # SMALL: 3 layers, the first dense
        perm = [(5 - e + 2 * layer) % 6 for e in range(6)]
        rows.append(perm + [perm[1], perm[4]])
    path = tmp_path_factory.mktemp("placement") / "placement.json"
    ExpertPlacement(rows, ep_size=4, num_logical=6).to_file(path)
    return path


def _generate_all(gateway: str) -> list[tuple[list[int], list[float]]]:
    """All prompts at once: batches form, every DP rank gets work, TBO has something to split."""
    with MeshClient(gateway, timeout_s=120) as client, cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        futs = [pool.submit(client.generate, token_ids=p, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                            logprobs=0) for p in PROMPTS]
        return [(c.token_ids, c.logprobs) for c in (f.result() for f in futs)]


@pytest.mark.parametrize(("prefill", "ep_size", "extra"), [
    (0, 1, ()),
    (0, 2, ()),
    (0, 2, ("--enable-tbo",)),
    (1, 2, ("--enable-tbo",)),
    (0, 4, ("--enable-tbo", "--redundant-experts", "2")),
    (0, 4, ("--expert-placement", "PLACEMENT")),
], ids=["ep1", "ep2", "ep2-tbo", "pd-ep2-tbo", "ep4-redundant-tbo", "ep4-placement-file"])
def test_ep_outputs_equal_in_process(prefill: int, ep_size: int, extra: tuple[str, ...], six_dir: Path,
                                     placement_file: Path, reference: list[tuple[list[int], list[float]]]) -> None:
    worker_args = [*FP32, *(str(placement_file) if a == "PLACEMENT" else a for a in extra)]
    mesh = start_mesh("--model", str(six_dir), "--prefill", str(prefill), "--decode", "1", "--ep-size", str(ep_size),
                      *worker_args)
    try:
        ranks = [name for name in mesh.services if name.startswith("decode-0")]
        assert len(ranks) == ep_size
        got = _generate_all(mesh.gateway)
    finally:
        mesh.stop()
    assert mesh.proc.returncode == 0
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(got, reference, strict=True):
        assert tokens == ref_tokens
        assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs, strict=True)) <= 1e-5
    assert_processes_gone(mesh)


def _running(mesh: RunningMesh) -> dict[str, int]:
    """Requests running on each decode DP rank."""
    running = {}
    for name, (address, _) in mesh.services.items():
        if name.startswith("decode"):
            with grpc.insecure_channel(address) as ch:
                load = decode_pb2_grpc.DecodeStub(ch).GetLoad(common_pb2.GetLoadRequest(), timeout=10)
            running[name] = load.num_running_requests
    return running


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


@pytest.mark.parametrize("max_migrations", [0, 2], ids=["no-migration", "migration"])
def test_killed_rank_fails_its_group_and_the_mesh_keeps_serving(six_dir: Path, max_migrations: int,
                                                                long_reference: list[list[int]]) -> None:
    mesh = start_mesh("--model", str(six_dir), "--prefill", "0", "--decode", "2", "--ep-size", "2", *FP32,
                      env={"MOEMESH_MAX_MIGRATIONS": str(max_migrations)})
    try:
        group = {name: mesh.services[name] for name in ("decode-0-dp0", "decode-0-dp1")}
        outcomes: list[str | list[int]] = []

        def long_request(i: int) -> str | list[int]:
            try:
                # The deadline covers the wait below for all eight to run (up to 60 s on a loaded machine) as well
                # as the kill's aftermath, which the assertion on `killed_at` bounds by itself.
                with MeshClient(mesh.gateway, timeout_s=150) as client:
                    return client.generate(token_ids=PROMPTS[i], max_tokens=LONG_TOKENS, temperature=0,
                                           ignore_eos=True).token_ids
            except MeshError as e:
                return f"{e.code.name}: {e}"

        # Eight streams over four DP ranks (the gateway spreads in-flight requests): two on each rank.
        with cf.ThreadPoolExecutor(8) as pool:
            futs = [pool.submit(long_request, i) for i in range(8)]
            # All eight decoding, some on each rank of the group about to fail: the kill lands mid-stream.
            until(lambda: _running(mesh), lambda r: sum(r.values()) == 8 and all(r[name] for name in group), 60,
                  "eight requests running, on both ranks of decode-0")
            os.kill(group["decode-0-dp1"][1], signal.SIGKILL)
            killed_at = time.monotonic()
            outcomes = [f.result(timeout=160) for f in futs]
        assert time.monotonic() - killed_at < 60
        if max_migrations:
            assert migrations(mesh) >= 2  # the killed group's two ranks had requests in flight
            # The failed group's requests continue on the other group: every one completes with the
            # undisturbed engine's greedy tokens, all of them (nothing repeated or lost at the migration).
            assert all(isinstance(o, list) for o in outcomes), outcomes
            for i, o in enumerate(outcomes):
                assert o == long_reference[i], i
        else:
            _check_group_failure(outcomes, long_reference)
        # The surviving rank of the failed group says NOT_SERVING; the mesh still answers.
        assert _health(group["decode-0-dp0"][0]) == health_pb2.HealthCheckResponse.NOT_SERVING
        with MeshClient(mesh.gateway, timeout_s=60) as client:
            for p in PROMPTS[:4]:
                assert len(client.generate(token_ids=p, max_tokens=5, temperature=0, ignore_eos=True).token_ids) == 5
    finally:
        mesh.stop()


def _check_group_failure(outcomes: list[str | list[int]], want: list[list[int]]) -> None:
    """Without migration: the killed rank's and its peer's requests end with an error naming the cause;
    the other group's requests complete with the in-process engine's tokens (`want`)."""
    errors = [o for o in outcomes if isinstance(o, str)]
    assert len(errors) >= 2, outcomes
    assert all(e.startswith("UNAVAILABLE") for e in errors), errors
    assert any("EP group failed" in e for e in errors), errors
    assert all(o == want[i] for i, o in enumerate(outcomes) if not isinstance(o, str)), outcomes
    assert len(errors) < len(outcomes), outcomes
