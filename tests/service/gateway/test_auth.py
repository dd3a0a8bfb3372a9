"""API keys at the gateway: a real gateway (gRPC and REST on loopback, fake workers) started with keys.

Every call to the `Gateway` service and every `/v1` REST call needs `authorization: Bearer KEY`; health,
reflection, /health, /metrics and the workers' `WorkerRegistry` do not.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moemesh.sdk import AsyncMeshClient, MeshClient, UnauthenticatedError
from moemesh.service.auth import ApiKeys, bearer_token, parse_api_keys
from moemesh.services.cli.main import main as moemesh
from moemesh.services.gateway.serve import add_arguments, config_from_args
from moemesh.v1 import common_pb2, gateway_pb2
from tests.service.gateway.doubles import FakeDecode, FakePrefill, Mesh, make_tokenizer_dir
from tests.service.gateway.rest_doubles import error_of

pytestmark = pytest.mark.timeout(60)
KEYS = "k1-secret,k2-secret"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("auth") / "tok")


# ---- keys and options ----------------------------------------------------------------------------

def test_keys_from_values_and_a_file(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("# the team's keys\nfile-1\n\n  file-2  \nk1\n")
    assert parse_api_keys(["k1,k2", " k3 "], f) == ("k1", "k2", "k3", "file-1", "file-2")
    assert parse_api_keys("a,,b") == ("a", "b") and parse_api_keys(None) == () and parse_api_keys("") == ()
    with pytest.raises(ValueError, match="whitespace"):
        parse_api_keys(["two words"])
    with pytest.raises(ValueError, match=r"--api-key-file .*: cannot read it"):
        parse_api_keys(None, tmp_path / "missing")


def test_bearer_tokens_are_checked_against_every_key() -> None:
    keys = ApiKeys(["k1", "longer-key"])
    assert keys.accepts("k1") and keys.accepts(b"longer-key") and len(keys) == 2
    for bad in ("k", "k1 ", "k11", "", "longer-ke", None):
        assert not keys.accepts(bad), bad
    assert bearer_token("Bearer abc") == b"abc" and bearer_token(b"bearer  abc ") == b"abc"
    for bad in ("Basic abc", "abc", "Bearer", "Bearer ", None):
        assert bearer_token(bad) is None, bad
    assert keys.check_metadata([("authorization", "Bearer k1")]) is None
    assert "Bearer KEY" in keys.check_metadata([])  # missing: says what to send
    assert keys.check_metadata([("authorization", "Bearer k2")]) == "the API key is not valid"
    with pytest.raises(ValueError):
        ApiKeys([])


def _gateway_cfg(argv: list[str], environ: dict[str, str]):
    parser = argparse.ArgumentParser()
    old = dict(os.environ)
    os.environ.update(environ)
    try:
        add_arguments(parser)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return config_from_args(parser.parse_args(argv))


def test_gateway_options_repeatable_comma_separated_file_and_environment(tmp_path: Path) -> None:
    assert _gateway_cfg(["--api-key", "a", "--api-key", "b,c"], {}).api_key == "a,b,c"
    assert _gateway_cfg([], {"MOEMESH_API_KEY": "x,y"}).api_key == "x,y"
    assert _gateway_cfg(["--api-key", "a"], {"MOEMESH_API_KEY": "x,y"}).api_key == "a"  # the flag wins
    (tmp_path / "keys").write_text("f1\n# f2\nf3\n")
    cfg = _gateway_cfg(["--api-key-file", str(tmp_path / "keys")], {"MOEMESH_API_KEY": "x"})
    assert cfg.api_key == "x,f1,f3" and "f1" not in repr(cfg)
    assert _gateway_cfg([], {"MOEMESH_API_KEY_FILE": str(tmp_path / "keys")}).api_key == "f1,f3"
    assert _gateway_cfg([], {}).api_key is None
    (tmp_path / "empty").write_text("# nobody\n")
    with pytest.raises(ValueError, match="no key in them"):
        _gateway_cfg(["--api-key-file", str(tmp_path / "empty")], {})


# ---- the gateway's gRPC API ----------------------------------------------------------------------

def _md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", key),)


def test_grpc_gateway_calls_need_a_key_health_reflection_and_registry_do_not(model_dir: Path) -> None:
    async def main() -> None:
        async with Mesh(model_dir, api_key=KEYS) as mesh:
            # The fakes register and heartbeat over WorkerRegistry without any key.
            await mesh.add(FakeDecode(), "d1")
            await mesh.add(FakePrefill(), "p1")
            stub = mesh.stub
            req = gateway_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=2))
            for metadata, why in ((None, "Bearer KEY"), (_md("Bearer wrong"), "not valid"),
                                  (_md("Basic k1-secret"), "Bearer KEY"), (_md("k1-secret"), "Bearer KEY"),
                                  (_md("Bearer k1-secret,k2-secret"), "not valid")):
                for call in (lambda md: stub.Tokenize(gateway_pb2.TokenizeRequest(text="hi"), metadata=md, timeout=5),
                             lambda md: stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=md, timeout=5)):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call(metadata)
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and why in err.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    [r async for r in stub.Generate(req, metadata=metadata, timeout=5)]
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            assert not mesh.workers[0].servicer.requests  # a refused request never reached a worker

            for key in ("Bearer k1-secret", "bearer k2-secret"):
                responses = [r async for r in stub.Generate(req, metadata=_md(key), timeout=5)]
                assert sum(len(r.token_ids) for r in responses) == 2 and responses[-1].usage.completion_tokens == 2
                models = await stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=_md(key), timeout=5)
                assert (models.models[0].num_decode_workers, models.models[0].num_prefill_workers) == (1, 1)

            health = await health_pb2_grpc.HealthStub(mesh.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            reflect = reflection_pb2_grpc.ServerReflectionStub(mesh.channel)
            answers = [a async for a in reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)]
            names = {s.name for s in answers[0].list_services_response.service}
            assert {"moemesh.v1.Gateway", "moemesh.v1.WorkerRegistry", "grpc.health.v1.Health"} <= names

    asyncio.run(main())


# ---- the REST facade -----------------------------------------------------------------------------

def test_rest_v1_needs_a_key_health_and_metrics_do_not(model_dir: Path) -> None:
    async def main() -> None:
        async with Mesh(model_dir, api_key=KEYS, http_port=0) as mesh:
            await mesh.add(FakeDecode(), "d1")
            async with httpx.AsyncClient(base_url=f"http://{mesh.app.http_address}", trust_env=False,
                                         timeout=20) as http:
                body = {"prompt": "hi", "max_tokens": 2}
                for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k1-secret"}):
                    err = error_of(await http.post("/v1/completions", json=body, headers=headers), 401)
                    assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
                    assert "Authorization: Bearer KEY" in err["message"]
                error_of(await http.get("/v1/models"), 401)
                for key in ("k1-secret", "k2-secret"):
                    r = await http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
                    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
                assert (await http.get("/health")).status_code == 200
                assert (await http.get("/metrics")).status_code == 200

    asyncio.run(main())


# ---- the SDK and `moemesh complete` --------------------------------------------------------------

def test_sdk_sends_its_key_from_the_argument_or_the_environment(model_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOEMESH_API_KEY", raising=False)

    async def main() -> None:
        async with Mesh(model_dir, api_key=KEYS) as mesh:
            await mesh.add(FakeDecode(), "d1")
            address = mesh.app.address
            async with AsyncMeshClient(address, timeout_s=10, api_key="k2-secret") as client:
                assert len((await client.generate("hi", max_tokens=3)).token_ids) == 3
                assert (await client.list_models())[0].num_decode_workers == 1
                assert await client.tokenize("hi")
            for client in (AsyncMeshClient(address, timeout_s=10), AsyncMeshClient(address, api_key="bad")):
                async with client:
                    with pytest.raises(UnauthenticatedError) as err:
                        await client.generate("hi", max_tokens=3)
                    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
                    with pytest.raises(UnauthenticatedError):
                        await client.list_models()

            def sync_calls() -> None:
                with MeshClient(address, timeout_s=10, api_key="k1-secret") as client:
                    assert [c.text for c in client.stream("hi", max_tokens=2)]
                    assert client.tokenize("hi")
                with MeshClient(address, timeout_s=10) as client, pytest.raises(UnauthenticatedError):
                    client.generate("hi", max_tokens=2)
                monkeypatch.setenv("MOEMESH_API_KEY", "k2-secret,k1-secret")  # a gateway's list: the first
                with MeshClient(address, timeout_s=10) as client:
                    assert client.generate("hi", max_tokens=2).finish_reason == "length"

            await asyncio.to_thread(sync_calls)

    asyncio.run(main())


def test_complete_command_takes_the_key(model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("MOEMESH_API_KEY", raising=False)

    async def main() -> None:
        async with Mesh(model_dir, api_key=KEYS) as mesh:
            await mesh.add(FakeDecode(), "d1")
            base = ["complete", "--target", mesh.app.address, "--max-tokens", "2", "hello"]
            assert await asyncio.to_thread(moemesh, [*base, "--api-key", "k1-secret"]) == 0
            out = capsys.readouterr()
            assert out.out.startswith("hello") and "[length]" in out.err
            assert await asyncio.to_thread(moemesh, base) == 1
            assert "UNAUTHENTICATED" in capsys.readouterr().err

    asyncio.run(main())
