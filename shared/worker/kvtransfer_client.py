"""Calls both sides of a KV handoff make to the kvtransfer service."""

from __future__ import annotations

import grpc

from moemesh.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc


async def report_room_failed(kv: kvtransfer_pb2_grpc.KvTransferStub, room: str, error: str) -> None:
    """Best effort: fail a room so the other side stops waiting (its lease would end it anyway)."""
    try:
        await kv.ReportTransfer(kvtransfer_pb2.ReportTransferRequest(
            room_id=room, state=kvtransfer_pb2.ROOM_STATE_FAILED, error=error), timeout=5)
    except grpc.aio.AioRpcError:
        pass  # unknown or already ended: nothing left to tell
