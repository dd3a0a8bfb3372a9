"""Mutual TLS and message size limits of the mesh's gRPC servers and channels, on real servers on loopback.

Certificates are made here with `cryptography`: a CA, a server and a client certificate it signs (for
127.0.0.1 and localhost), and a second CA with its own client certificate that the first must refuse.
`write_pki` is also what the integration test of the whole mesh uses.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import os
import re
import select
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.service.config import apply_env_defaults
from shared.service.server import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES, GrpcServer
from shared.service.tls import TlsConfig, add_tls_arguments, configure_tls, process_tls, tls_from_args
from shared.telemetry.grpc_tracing import insecure_channel, mesh_channel

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]
HOSTS = ("127.0.0.1", "localhost")


# ---- certificates --------------------------------------------------------------------------------

Issued = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(cn: str) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue(ca: Issued, cn: str, hosts: tuple[str, ...] = HOSTS) -> Issued:
    """A leaf certificate for `hosts`, good as server and as client (every service is both)."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


@dataclass(frozen=True)
class Pki:
    """Files in one folder: `ca.crt`, `tls.crt`, `tls.key` (the mesh's, `moemesh up --tls-dir` names),
    `client.crt`/`client.key` (signed by the same CA), `rogue-ca.crt`, `rogue.crt`/`rogue.key` (another CA)."""

    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def mesh(self) -> TlsConfig:
        return TlsConfig.from_files(self.path("tls.crt"), self.path("tls.key"), self.path("ca.crt"))

    def client(self) -> TlsConfig:
        return TlsConfig.from_files(self.path("client.crt"), self.path("client.key"), self.path("ca.crt"))

    def rogue(self) -> TlsConfig:
        """A client whose certificate another CA signed (it trusts the mesh's CA, so only its own cert is bad)."""
        return TlsConfig.from_files(self.path("rogue.crt"), self.path("rogue.key"), self.path("ca.crt"))


def write_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca, rogue_ca = make_ca("moemesh test CA"), make_ca("rogue CA")
    files = {"ca.crt": ca, "rogue-ca.crt": rogue_ca}
    for name, cert_key in files.items():
        (folder / name).write_bytes(cert_key[0].public_bytes(serialization.Encoding.PEM))
    for stem, signer in (("tls", ca), ("client", ca), ("rogue", rogue_ca)):
        cert, key = issue(signer, f"moemesh {stem}")
        (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{stem}.key").write_bytes(_pem_key(key))
    return Pki(folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return write_pki(tmp_path_factory.mktemp("pki"))


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
    (tmp_path / "m.key").write_bytes(_pem_key(key))
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
                async with insecure_channel(server.address, options=CHANNEL_OPTIONS) as ch:
                    assert await _check(ch) == health_pb2.HealthCheckResponse.SERVING
                err = await _refused(grpc.aio.insecure_channel(server.address))
                assert err.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            configure_tls(previous)
        assert process_tls() is previous

    asyncio.run(main())


def test_service_process_serves_mtls_from_environment_variables(pki: Pki) -> None:
    """`moemesh serve kvtransfer` with MOEMESH_TLS_*: plain text refused, the mesh's certificate served."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MOEMESH_TLS_CERT": pki.path("tls.crt"),
           "MOEMESH_TLS_KEY": pki.path("tls.key"), "MOEMESH_TLS_CA": pki.path("ca.crt")}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "serve", "kvtransfer", "--port", "0",
                             "--metrics-port", "-1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "no listening line within 30 s"
        m = re.match(r"^kvtransfer listening on (\S+:\d+)$", proc.stdout.readline().strip())
        assert m, proc.stderr.read() if proc.poll() is not None else "unexpected first line"

        async def main() -> None:
            async with mesh_channel(m.group(1), tls=pki.client()) as ch:
                assert await _check(ch, "moemesh.v1.KvTransfer") == health_pb2.HealthCheckResponse.SERVING
            err = await _refused(grpc.aio.insecure_channel(m.group(1)))
            assert err.code() == grpc.StatusCode.UNAVAILABLE

        asyncio.run(main())
        # The containers' health probe presents the service's own certificate from the same variables.
        probe = [sys.executable, str(ROOT / "deploy" / "healthcheck.py"), "--addr", m.group(1)]
        result = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and "SERVING" in result.stdout, result.stdout + result.stderr
        plain = {k: v for k, v in env.items() if not k.startswith("MOEMESH_TLS_")}
        assert subprocess.run([*probe, "--timeout", "2"], env=plain, capture_output=True, timeout=30).returncode == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_half_configured_tls_stops_the_service_with_a_message(pki: Pki) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MOEMESH_TLS_CERT": pki.path("tls.crt")}
    for service in ("kvtransfer", "eplb"):
        proc = subprocess.run([sys.executable, "-m", "services.cli.main", "serve", service, "--port", "0",
                               "--metrics-port", "-1"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 2, (service, proc.stderr)
        assert "needs --tls-cert, --tls-key and --tls-ca together" in proc.stderr, proc.stderr


# ---- message size limits -------------------------------------------------------------------------

def test_limits_agree_and_fit_the_largest_messages() -> None:
    from shared.sdk.channel import CHANNEL_OPTIONS as SDK_OPTIONS
    from shared.transfer.chunk import DEFAULT_CHUNK_BYTES

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
            async with insecure_channel(server.address) as ch:
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
