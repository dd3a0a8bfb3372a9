"""The whole mesh locked down (`moemesh up --tls-dir DIR --api-key-file FILE`): mutual TLS between every
service and for clients of the gateway's gRPC API, plus an API key; real processes on loopback.

A request through the SDK with a client certificate and the key runs end to end in PD mode (the
prefill worker computes the prompt, its KV goes through kvtransfer's relay to the decode worker) and
gives the in-process engine's greedy tokens; clients without a valid certificate are refused, by the
gateway and by every internal service.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.engine.engine import Engine, EngineConfig
from moemesh.engine.sampling_params import SamplingParams
from moemesh.model.default import default_model_dir
from moemesh.sdk import MeshClient, UnauthenticatedError, UnavailableError
from tests.pki import Pki, write_pki
from tests.processes.mesh.launch import RunningMesh, start_mesh
from tests.processes.mesh.waits import assert_processes_gone

KEY = "mtls-test-key"
PROMPT = "Locked down, the mesh is"
MAX_TOKENS = 8
SERVICES = {"kvtransfer": "moemesh.v1.KvTransfer", "eplb": "moemesh.v1.Eplb", "gateway": "moemesh.v1.Gateway",
            "prefill-0": "moemesh.v1.Prefill", "decode-0": "moemesh.v1.Decode"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return write_pki(tmp_path_factory.mktemp("mtls-pki"))


@pytest.fixture(scope="module")
def mesh(pki: Pki) -> Iterator[RunningMesh]:
    keys = pki.dir / "api-keys"
    keys.write_text(f"# test keys\n{KEY}\n")
    # No --transfer: with TLS on, `moemesh up` chooses the relay (over kvtransfer's gRPC, so under mTLS).
    running = start_mesh("--prefill", "1", "--decode", "1", "--tls-dir", str(pki.dir),
                         "--api-key-file", str(keys), env={"MOEMESH_API_KEY": ""})
    try:
        yield running
    finally:
        running.stop()
    assert running.proc.returncode == 0
    assert_processes_gone(running)


def _client(mesh: RunningMesh, **kw: object) -> MeshClient:
    return MeshClient(mesh.gateway, timeout_s=60, retries=0, **kw)


def _good(pki: Pki) -> dict[str, str]:
    return {"tls_ca": pki.path("ca.crt"), "tls_cert": pki.path("client.crt"), "tls_key": pki.path("client.key")}


def _metrics(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        return resp.read().decode()


def _prompt_tokens(metrics_address: str) -> float:
    text = _metrics(metrics_address)
    m = re.search(r'^moemesh_prompt_tokens_total\{role="prefill"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_request_with_client_certificate_and_key_runs_end_to_end(mesh: RunningMesh, pki: Pki) -> None:
    assert "mutual TLS" in "\n".join(mesh.output) and KEY not in "\n".join(mesh.output)
    assert "KV over relay" in "\n".join(mesh.output)  # the plane TLS covers, chosen by default
    engine = Engine(EngineConfig(model=str(default_model_dir()), kv_cache_mb=64))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    (reference,) = [c.token_ids for c in engine.generate([PROMPT], params)]

    before = _prompt_tokens(mesh.metrics["prefill-0"])
    with _client(mesh, api_key=KEY, **_good(pki)) as client:
        (model,) = client.list_models()
        assert (model.num_prefill_workers, model.num_decode_workers) == (1, 1)
        done = client.generate(prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        assert done.token_ids == reference and done.finish_reason == "length"
        chunks = list(client.stream(prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
        assert [t for c in chunks for t in c.token_ids] == reference
    # The prompt was computed by the prefill worker (PD), not by the decode worker on its own.
    assert _prompt_tokens(mesh.metrics["prefill-0"]) > before
    # The workers' expert load reached eplb over mTLS too (a window a second).
    deadline = time.monotonic() + 20
    while "moemesh_eplb_mean_balancedness{" not in _metrics(mesh.metrics["eplb"]):
        assert time.monotonic() < deadline, "no expert load reached eplb"
        time.sleep(0.5)

    # The REST facade (plain HTTP on loopback) takes the same key.
    http = mesh.services["gateway-http"][0]
    with httpx.Client(base_url=f"http://{http}", trust_env=False, timeout=60) as rest:
        assert rest.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 401
        r = rest.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                      headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200, r.text


def test_gateway_refuses_clients_without_a_valid_certificate_or_key(mesh: RunningMesh, pki: Pki) -> None:
    refused = [
        {"tls_ca": pki.path("ca.crt")},  # TLS, but no client certificate
        {"tls_ca": pki.path("ca.crt"), "tls_cert": pki.path("rogue.crt"), "tls_key": pki.path("rogue.key")},
        {},  # plain text
        {"tls_ca": pki.path("rogue-ca.crt"), "tls_cert": pki.path("client.crt"), "tls_key": pki.path("client.key")},
    ]
    for kw in refused:
        with _client(mesh, api_key=KEY, **kw) as client, pytest.raises(UnavailableError):
            client.generate(prompt=PROMPT, max_tokens=2)
    # A good certificate without the key: through TLS, then refused by the key check.
    with _client(mesh, api_key="wrong", **_good(pki)) as client, pytest.raises(UnauthenticatedError):
        client.generate(prompt=PROMPT, max_tokens=2)


def test_every_internal_service_requires_the_mesh_certificate(mesh: RunningMesh, pki: Pki) -> None:
    good = grpc.ssl_channel_credentials((pki.dir / "ca.crt").read_bytes(), (pki.dir / "client.key").read_bytes(),
                                        (pki.dir / "client.crt").read_bytes())
    no_cert = grpc.ssl_channel_credentials((pki.dir / "ca.crt").read_bytes())
    for name, service in SERVICES.items():
        address = mesh.services[name][0]
        assert address.startswith("127.0.0.1:"), (name, address)  # loopback unless told otherwise
        with grpc.secure_channel(address, good) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, name
        for channel in (grpc.insecure_channel(address), grpc.secure_channel(address, no_cert)):
            with channel, pytest.raises(grpc.RpcError) as err:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, name


def test_tls_dir_without_its_files_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"--tls-dir .*: no ca\.crt"):
        start_mesh("--tls-dir", str(tmp_path), timeout_s=30)
