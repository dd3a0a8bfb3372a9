"""Certificates for the TLS tests, made with `cryptography`: a CA, a server and a client certificate it signs
(for 127.0.0.1 and localhost), and a second CA with its own client certificate that the first must refuse."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from moemesh.service.tls import TlsConfig

HOSTS = ("127.0.0.1", "localhost")
Issued = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
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
        (folder / f"{stem}.key").write_bytes(pem_key(key))
    return Pki(folder)
