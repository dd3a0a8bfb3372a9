"""Mutual TLS and message size limits of the mesh's gRPC servers and channels, on real servers on loopback.

Certificates come from tests/pki.py (`cryptography`): a CA, a server and a client certificate it signs (for
127.0.0.1 and localhost), and a second CA with its own client certificate that the first must refuse.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.service.channel import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES, mesh_channel
from moemesh.service.config import apply_env_defaults
from moemesh.service.server import GrpcServer
from moemesh.service.tls import TlsConfig, add_tls_arguments, configure_tls, process_tls, tls_from_args
from tests.pki import Pki, issue, make_ca, pem_key

pytestmark = pytest.mark.timeout(60)


# ---- options -------------------------------------------------------------------------------------

def _parse(argv: list[str], environ: dict[str, str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_tls_arguments(p)
    apply_env_defaults(p, environ or {})
    return p.parse_args(argv)


def test_options_all_or_nothing_from_flags_or_environment(pki: Pki, tmp_path: Path) -> None:
    assert tls_from_args(_parse([])) is None
    env = {"MOEMESH_TLS_CERT": pki.path("tls.crt"), "MOEMESH_TLS_KEY": pki.path("tls.key"),
           "MOEMESH_TLS_CA": pki.path("ca.crt")}
    cfg = tls_from_args(_parse([], env))
    assert cfg is not None and cfg.cert == (pki.dir / "tls.crt").read_bytes() and cfg.server_name is None
    # A flag wins over its variable.
    cfg = tls_from_args(_parse(["--tls-cert", pki.path("client.crt"), "--tls-key", pki.path("client.key"),
                                "--tls-server-name", "mesh.internal"], env))
    assert cfg.cert == (pki.dir / "client.crt").read_bytes() and cfg.server_name == "mesh.internal"
    assert "BEGIN" not in repr(cfg)  # keys stay out of logs
    with pytest.raises(ValueError, match=r"missing --tls-key \(MOEMESH_TLS_KEY\), --tls-ca"):
        tls_from_args(_parse(["--tls-cert", pki.path("tls.crt")]))
    with pytest.raises(ValueError, match=r"--tls-ca .*nope\.pem: cannot read it"):
        tls_from_args(_parse(["--tls-cert", pki.path("tls.crt"), "--tls-key", pki.path("tls.key"),
                              "--tls-ca", str(tmp_path / "nope.pem")]))
    (tmp_path / "plain.txt").write_text("not a certificate")
    with pytest.raises(ValueError, match=r"--tls-ca .*plain\.txt: not a PEM file"):
        TlsConfig.from_files(pki.path("tls.crt"), pki.path("tls.key"), tmp_path / "plain.txt")


# ---- a real server -------------------------------------------------------------------------------

@asynccontextmanager
async def _server(tls: TlsConfig | None = None, max_message_bytes: int = MAX_MESSAGE_BYTES
                  ) -> AsyncIterator[GrpcServer]:
    """A GrpcServer on 127.0.0.1:0 with nothing but health (SERVING) and reflection."""
    server = GrpcServer("127.0.0.1", 0, tls=tls, max_message_bytes=max_message_bytes)
    await server.start()
    await server.set_serving(True)
    try:
        yield server
    finally:
        await server.stop(0)


async def _check(channel: grpc.aio.Channel, service: str = "") -> int:
    resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return resp.status


async def _refused(channel: grpc.aio.Channel) -> grpc.aio.AioRpcError:
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _check(channel)
    return err.value


def test_server_requires_a_client_certificate_of_its_ca(pki: Pki) -> None:
    async def main() -> None:
        async with _server(tls=pki.mesh()) as server:
            async with mesh_channel(server.address, tls=pki.client()) as ch:
                assert await _check(ch) == health_pb2.HealthCheckResponse.SERVING
            # "localhost" is in the certificate too.
            async with mesh_channel(f"localhost:{server.port}", tls=pki.client()) as ch:
                assert await _check(ch) == health_pb2.HealthCheckResponse.SERVING

            # TLS that trusts the server but shows no certificate: the handshake fails.
            no_cert = grpc.ssl_channel_credentials(root_certificates=pki.client().ca)
            err = await _refused(grpc.aio.secure_channel(server.address, no_cert))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            # A certificate another CA signed.
            err = await _refused(mesh_channel(server.address, tls=pki.rogue()))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            # Plain text.
            err = await _refused(grpc.aio.insecure_channel(server.address))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            # A client that does not trust the server's CA refuses it as well.
            distrustful = TlsConfig(pki.client().cert, pki.client().key, (pki.dir / "rogue-ca.crt").read_bytes())
            err = await _refused(mesh_channel(server.address, tls=distrustful))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            # After all that, the server still serves.
            async with mesh_channel(server.address, tls=pki.client()) as ch:
                assert await _check(ch) == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(main())


def test_server_name_override_lets_one_certificate_serve_any_address(tmp_path: Path) -> None:
    """A certificate for "mesh.internal" only, dialled by IP: refused, unless the client names it."""
    ca = make_ca("override CA")
    cert, key = issue(ca, "mesh", hosts=("mesh.internal",))
    (tmp_path / "ca.crt").write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    (tmp_path / "m.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "m.key").write_bytes(pem_key(key))
    named = TlsConfig.from_files(tmp_path / "m.crt", tmp_path / "m.key", tmp_path / "ca.crt")

    async def main() -> None:
        async with _server(tls=named) as server:
            err = await _refused(mesh_channel(server.address, tls=named))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            overridden = TlsConfig(named.cert, named.key, named.ca, server_name="mesh.internal")
            async with mesh_channel(server.address, tls=overridden) as ch:
                assert await _check(ch) == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(main())


def test_process_config_makes_every_server_and_channel_tls(pki: Pki) -> None:
    """What `moemesh serve` does at start-up: one config, then unchanged call sites speak mTLS."""
    async def main() -> None:
        previous = configure_tls(pki.mesh())
        try:
            assert process_tls() is not None
            async with _server() as server:  # no tls= : the process's
                assert server.tls is not None
                async with mesh_channel(server.address, options=CHANNEL_OPTIONS) as ch:
                    assert await _check(ch) == health_pb2.HealthCheckResponse.SERVING
                err = await _refused(grpc.aio.insecure_channel(server.address))
                assert err.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            configure_tls(previous)
        assert process_tls() is previous

    asyncio.run(main())


# ---- message size limits -------------------------------------------------------------------------

def test_limits_agree_and_fit_the_largest_messages() -> None:
    from moemesh.sdk.channel import CHANNEL_OPTIONS as SDK_OPTIONS
    from moemesh.transfer.chunk import DEFAULT_CHUNK_BYTES

    assert dict(CHANNEL_OPTIONS) == {"grpc.max_send_message_length": MAX_MESSAGE_BYTES,
                                     "grpc.max_receive_message_length": MAX_MESSAGE_BYTES}
    assert dict(SDK_OPTIONS)["grpc.max_receive_message_length"] == MAX_MESSAGE_BYTES
    assert dict(SDK_OPTIONS)["grpc.max_send_message_length"] == MAX_MESSAGE_BYTES
    # A KV chunk (rows plus its small header) is the largest message the mesh sends, with room to spare.
    assert 4 * DEFAULT_CHUNK_BYTES <= MAX_MESSAGE_BYTES <= 256 * 2**20


def test_oversized_message_is_refused_with_resource_exhausted() -> None:
    async def main() -> None:
        async with _server() as server:
            unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
            async with grpc.aio.insecure_channel(server.address, options=unlimited) as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                huge = health_pb2.HealthCheckRequest(service="x" * (MAX_MESSAGE_BYTES + 1))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Check(huge, timeout=30)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                # Refused, not crashed: the same server and channel keep working.
                assert await _check(ch) == health_pb2.HealthCheckResponse.SERVING
            # The mesh's own channels refuse to send one in the first place.
            async with mesh_channel(server.address) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await health_pb2_grpc.HealthStub(ch).Check(huge, timeout=30)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert await _check(ch) == health_pb2.HealthCheckResponse.SERVING
        # A server with a small limit, and a message just over it, just under it.
        async with _server(max_message_bytes=1024) as small:
            async with grpc.aio.insecure_channel(small.address) as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Check(health_pb2.HealthCheckRequest(service="y" * 1100), timeout=5)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                with pytest.raises(grpc.aio.AioRpcError) as err:  # within the limit: an unknown service
                    await stub.Check(health_pb2.HealthCheckRequest(service="y" * 900), timeout=5)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(main())
