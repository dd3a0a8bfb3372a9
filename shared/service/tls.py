"""Optional mutual TLS between the mesh's services: one certificate, key and CA bundle per process.

    add_tls_arguments(parser)            # --tls-cert/--tls-key/--tls-ca (MOEMESH_TLS_*), before apply_env_defaults
    configure_tls(tls_from_args(args))   # once, at start-up (run_service and the services' `run` do it)

With a config set, every `GrpcServer` of the process serves TLS and requires a client certificate
signed by the CA, and every channel made by `moemesh.telemetry.grpc_tracing.insecure_channel` presents
the process's certificate and checks the server's against the same CA. The config is process-wide
so that no call site has to carry it: a service is either all mTLS or all plain text.

Imports grpc and the standard library only (the gateway runs without torch; grpc_tracing imports this).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

_PEM_MARK = b"-----BEGIN "


@dataclass(frozen=True)
class TlsConfig:
    """PEM bytes of this process's certificate chain, its private key and the CA bundle it trusts.

    `server_name`, when set, is the name checked in every server's certificate instead of the host
    dialled: one certificate can then serve a whole mesh whose addresses are pod IPs.
    """

    cert: bytes = field(repr=False)
    key: bytes = field(repr=False)
    ca: bytes = field(repr=False)
    server_name: str | None = None
    source: str = ""  # where the files came from, for messages

    @classmethod
    def from_files(cls, cert: str | os.PathLike[str], key: str | os.PathLike[str], ca: str | os.PathLike[str],
                   server_name: str | None = None) -> TlsConfig:
        """Read the three PEM files; ValueError naming the file that is missing or not PEM."""
        return cls(_read_pem(cert, "--tls-cert"), _read_pem(key, "--tls-key"), _read_pem(ca, "--tls-ca"),
                   server_name or None, source=str(cert))

    def server_credentials(self) -> grpc.ServerCredentials:
        """A server's side: present `cert`, require a client certificate signed by `ca`."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """A client's side: present `cert`, accept only servers whose certificate `ca` signed."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _read_pem(path: str | os.PathLike[str], option: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot read it ({e.strerror or e})") from None
    if _PEM_MARK not in data:
        raise ValueError(f"{option} {path}: not a PEM file (no '-----BEGIN' line)")
    return data


# ---- the process's config ------------------------------------------------------------------------

_process_tls: TlsConfig | None = None


def configure_tls(cfg: TlsConfig | None) -> TlsConfig | None:
    """Make `cfg` the process's TLS config (None: plain text); returns the previous one (tests restore it)."""
    global _process_tls
    previous, _process_tls = _process_tls, cfg
    return previous


def process_tls() -> TlsConfig | None:
    """The config `configure_tls` set, or None."""
    return _process_tls


# ---- options -------------------------------------------------------------------------------------

def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """--tls-cert, --tls-key, --tls-ca and --tls-server-name (each also MOEMESH_<DEST>); call it before
    `apply_env_defaults(parser)`. Unless already there (a parser built from several helpers)."""
    if "--tls-cert" in parser._option_string_actions:
        return
    g = parser.add_argument_group("mutual TLS (all three files, or none: plain text)")
    g.add_argument("--tls-cert", default=None, metavar="FILE",
                   help="this service's certificate chain (PEM), presented to servers and clients "
                        "(env MOEMESH_TLS_CERT)")
    g.add_argument("--tls-key", default=None, metavar="FILE",
                   help="the certificate's private key (PEM) (env MOEMESH_TLS_KEY)")
    g.add_argument("--tls-ca", default=None, metavar="FILE",
                   help="CA bundle (PEM) that signs every peer's certificate: clients without one are "
                        "refused (env MOEMESH_TLS_CA)")
    g.add_argument("--tls-server-name", default=None, metavar="NAME",
                   help="name to verify in servers' certificates instead of the host dialled, e.g. one "
                        "shared certificate for a mesh addressed by pod IPs (env MOEMESH_TLS_SERVER_NAME)")


def tls_from_args(args: argparse.Namespace) -> TlsConfig | None:
    """The TlsConfig of parsed `add_tls_arguments` options; None when none of the files is given.

    ValueError when only some are given (a half-configured mesh would fail later and less clearly) or
    a file cannot be read.
    """
    files = {"--tls-cert": getattr(args, "tls_cert", None), "--tls-key": getattr(args, "tls_key", None),
             "--tls-ca": getattr(args, "tls_ca", None)}
    given = [name for name, value in files.items() if value]
    if not given:
        return None
    if len(given) != len(files):
        missing = ", ".join(f"{name} (MOEMESH_{name[2:].replace('-', '_').upper()})"
                            for name, value in files.items() if not value)
        raise ValueError(f"mutual TLS needs --tls-cert, --tls-key and --tls-ca together; missing {missing}")
    return TlsConfig.from_files(files["--tls-cert"], files["--tls-key"], files["--tls-ca"],
                                getattr(args, "tls_server_name", None))


def configure_tls_from_args(args: argparse.Namespace) -> TlsConfig | None:
    """`configure_tls(tls_from_args(args))`: what a service's start-up calls; returns the config."""
    cfg = tls_from_args(args)
    configure_tls(cfg)
    return cfg
