"""Channels to the gateway, sync and asyncio, with the options both clients share."""

from __future__ import annotations

import grpc

# Long prompts as token ids exceed gRPC's 4 MB default.
_MAX_MESSAGE_BYTES = 256 * 2**20
# gRPC's own reconnect backoff starts at 1 s and grows to 2 minutes; while it waits, every call fails at
# once, which would make the client's own retries useless against a gateway that is just starting.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def sync_channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)


def aio_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
