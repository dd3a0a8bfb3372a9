"""API keys: parsing them from options, checking a bearer token in constant time, and a gRPC server
interceptor that refuses calls to protected services without one (UNAUTHENTICATED).

    keys = ApiKeys(parse_api_keys(["k1,k2"], key_file="keys.txt"))
    server = GrpcServer(host, port, interceptors=[ApiKeyInterceptor(keys, ["moemesh.v1.Gateway"])])

Clients send gRPC metadata `authorization: Bearer KEY` (the REST facade: the HTTP header of the same
name), as vLLM's and OpenAI's clients do. Only the services named are protected: health and reflection
stay open for probes and tooling.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

AUTHORIZATION = "authorization"
MISSING = "an API key is required: send the metadata 'authorization: Bearer KEY'"
WRONG = "the API key is not valid"


def parse_api_keys(values: str | Iterable[str] | None = None,
                   key_file: str | os.PathLike[str] | None = None) -> tuple[str, ...]:
    """Keys from option values (each may hold several, comma-separated) and from a file (one per line;
    blank lines and `#` comments skipped), in order, without duplicates.

    ValueError when the file cannot be read or a key holds whitespace (no header could carry it).
    """
    if isinstance(values, str):
        values = [values]
    raw = [part for value in values or () for part in value.split(",")]
    if key_file:
        try:
            lines = Path(key_file).read_text().splitlines()
        except OSError as e:
            raise ValueError(f"--api-key-file {key_file}: cannot read it ({e.strerror or e})") from None
        raw += [line for line in lines if not line.lstrip().startswith("#")]
    keys: dict[str, None] = {}
    for key in (k.strip() for k in raw):
        if not key:
            continue
        if any(c.isspace() for c in key):
            raise ValueError("an API key must not contain whitespace")
        keys[key] = None
    return tuple(keys)


def bearer_token(value: str | bytes | None) -> bytes | None:
    """The token of an `authorization` value `Bearer TOKEN` (scheme in any case), else None."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.encode()
    scheme, _, token = value.strip().partition(b" ")
    token = token.strip()
    return token if scheme.lower() == b"bearer" and token else None


class ApiKeys:
    """A set of accepted keys. `accepts(token)` compares with every key in constant time (digests of
    equal length, no early exit), so neither a key's length nor which key matched shows in the timing."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(hashlib.sha256(k.encode()).digest() for k in keys)
        if not self._digests:
            raise ValueError("ApiKeys needs at least one key")

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, token: bytes | str | None) -> bool:
        if token is None:
            return False
        digest = hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()
        ok = False
        for key in self._digests:
            ok |= hmac.compare_digest(digest, key)
        return ok

    def check_metadata(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """None when the call's metadata carries an accepted key, else why it is refused."""
        value = next((v for k, v in metadata or () if k == AUTHORIZATION), None)
        token = bearer_token(value)
        if token is None:
            return MISSING
        return None if self.accepts(token) else WRONG


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to `services` (full names, e.g. "moemesh.v1.Gateway") without an accepted key.

    Put it first among a server's interceptors: a refused call then runs no handler, opens no span
    and the request is answered UNAUTHENTICATED before the servicer sees it.
    """

    def __init__(self, keys: ApiKeys, services: Iterable[str]) -> None:
        self.keys = keys
        self.prefixes = tuple(f"/{s}/" for s in services)

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefixes):
            return handler
        reason = self.keys.check_metadata(details.invocation_metadata)
        if reason is None:
            return handler
        return _refusing(handler, reason)


def _refusing(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour replaced by an UNAUTHENTICATED abort (same kind, same (de)serializers)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        if getattr(handler, kind):
            return handler._replace(**{kind: refuse})
    return handler
