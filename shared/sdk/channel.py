"""Channels to the gateway, sync and asyncio, with the options, TLS and API key both clients share."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

# The mesh's message size limit (shared/service/channel.py MAX_MESSAGE_BYTES; a test checks they agree):
# the gateway refuses bigger messages anyway, and a client should not accept unbounded answers.
_MAX_MESSAGE_BYTES = 64 * 2**20
# gRPC's own reconnect backoff starts at 1 s and grows to 2 minutes; while it waits, every call fails at
# once, which would make the client's own retries useless against a gateway that is just starting.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
API_KEY_ENV = "MOEMESH_API_KEY"

PathOrPem = str | os.PathLike[str] | bytes


@dataclass(frozen=True)
class ClientTls:
    """What a client needs for TLS: the CA bundle that signs the gateway's certificate (None: the
    system's roots) and, for mutual TLS, a client certificate chain and its key; all PEM bytes."""

    ca: bytes | None = field(default=None, repr=False)
    cert: bytes | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def client_tls(ca: PathOrPem | None = None, cert: PathOrPem | None = None, key: PathOrPem | None = None,
               server_name: str | None = None) -> ClientTls | None:
    """A ClientTls from file paths (or PEM bytes); None when none is given (plain text).

    ValueError when only one of cert and key is given, or a file cannot be read.
    """
    if ca is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs its key: give tls_cert and tls_key together")
    return ClientTls(_pem(ca, "tls_ca"), _pem(cert, "tls_cert"), _pem(key, "tls_key"), server_name or None)


def _pem(value: PathOrPem | None, name: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as e:
        raise ValueError(f"{name} {value}: cannot read it ({e.strerror or e})") from None


def api_key_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata carrying `api_key` (else the first key of $MOEMESH_API_KEY, which a gateway
    also reads as a comma-separated list); None when there is no key."""
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV, "").split(",")[0].strip() or None
    if not api_key:
        return None
    return (("authorization", f"Bearer {api_key}"),)


def _options(target: str, tls: ClientTls | None) -> list[tuple[str, Any]]:
    # A dns:/// name that resolves to several gateways: spread calls over all of them, not only the first.
    balance = [("grpc.lb_policy_name", "round_robin")] if target.startswith("dns:") else []
    return [*CHANNEL_OPTIONS, *balance, *(tls.options() if tls is not None else [])]


def sync_channel(target: str, tls: ClientTls | None = None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(target, options=_options(target, tls))
    return grpc.secure_channel(target, tls.credentials(), options=_options(target, tls))


def aio_channel(target: str, tls: ClientTls | None = None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(target, options=_options(target, tls))
    return grpc.aio.secure_channel(target, tls.credentials(), options=_options(target, tls))
