"""The mesh's gRPC channels and the message size limit every server and channel shares.

    channel = mesh_channel("kvtransfer:50060")   # traced, size-limited, mutual TLS when the process has TLS
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from moemesh.service.tls import TlsConfig, process_tls
from moemesh.telemetry.grpc_tracing import client_interceptors

# The largest message any service sends or accepts, on every server and channel of the mesh; bigger
# ones are refused with RESOURCE_EXHAUSTED before they are buffered whole. KV chunks are the largest
# messages: senders cut them at moemesh.transfer.chunk.DEFAULT_CHUNK_BYTES (4 MiB of rows), so 64 MiB
# leaves room for a raised chunk size and for prompts of millions of tokens (a token id is <= 5 bytes),
# while bounding what one call can make a server allocate (gRPC's own default: 4 MiB received, no limit
# sent). The SDK keeps the same number (shared/sdk/channel.py; a test checks they agree).
MAX_MESSAGE_BYTES = 64 * 2**20


def message_size_options(max_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC options limiting sent and received messages to `max_bytes`."""
    return [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)]


CHANNEL_OPTIONS = message_size_options()

def mesh_channel(target: str, options: Sequence[tuple[str, Any]] | None = None,
                 tls: TlsConfig | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel for the mesh's internal calls: it carries the caller's trace context on every
    call, limits message sizes (`CHANNEL_OPTIONS` unless `options` set their own),
    and speaks mutual TLS with `tls`, or with the process's config (`moemesh.service.tls.configure_tls`)
    when there is one, else plain text. The config is looked up here, at each channel's creation, so
    that every call site stays the same whether the mesh runs with TLS or not.
    """
    merged = dict(CHANNEL_OPTIONS)
    merged.update(options or ())
    tls = tls if tls is not None else process_tls()
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(merged.items()), interceptors=client_interceptors())
    merged.update(tls.channel_options())
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=list(merged.items()),
                                   interceptors=client_interceptors())
