"""The KV data-plane interface. Legend: L layers, N tokens, W row width (kv_lora_rank + rope dim).

A room is one request's handoff. The decode worker's `KvReceiver` listens on its plane; for each
room it expects rows for tokens [0, num_tokens), writes each verified chunk into its own pages
through a callback, and finally gets the prefill's first token. The prefill worker's `KvSender`
pushes a room's rows, chunk by chunk, to the receiver's address (which kvtransfer's rendezvous
gave it), then the first token on the last chunk. Every chunk carries a CRC-32 that the receiver checks.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import torch


class TransferError(RuntimeError):
    """A room's KV could not be moved (peer gone, checksum mismatch, missing chunk, timeout)."""


class PlaneUnavailable(RuntimeError):
    """A data plane was chosen whose package is missing; the message names the package and the fallback.

    Raised when the backend is created (at start-up), never on the first request.
    """


@dataclass(frozen=True)
class FirstToken:
    """The prefill's sampled token, delivered with the room's last chunk."""

    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None


@dataclass(frozen=True)
class RowBlock:
    """Rows of tokens [token_start, token_start + N) for every layer: `rows` [L, N, W]."""

    token_start: int
    rows: torch.Tensor


# Writes a verified block into the receiver's pages: (token_start, rows [L, N, W]) -> None.
RowWriter = Callable[[int, torch.Tensor], None]


class KvReceiver(abc.ABC):
    """Decode side: one per worker, listening for every room sent to it."""

    plane: str  # its registered name (planes.py): "ucx", "relay", "inproc"...

    @abc.abstractmethod
    async def start(self) -> None:
        """Start listening (bind, connect to the relay...)."""

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """What to register at kvtransfer as this receiver's data-plane address ("" for the relay)."""

    @abc.abstractmethod
    async def receive(self, room_id: str, num_tokens: int, write: RowWriter,
                      timeout_s: float) -> tuple[FirstToken, int]:
        """Wait for the room's chunks, verify each, `write` them, and return (first token, bytes received).

        Must be called before or while the sender sends (chunks that arrive first are buffered).
        `write` runs in this task, once per chunk in token order, with rows [L, N, W] the receiver may keep;
        an exception from it propagates unchanged. Chunks must cover exactly tokens [0, num_tokens).
        Raises TransferError on a bad checksum, a gap, a wrong row count, the timeout, `cancel` or `close`.
        """

    @abc.abstractmethod
    async def cancel(self, room_id: str) -> None:
        """Stop waiting for a room (its request was cancelled); buffered chunks are dropped.

        A running `receive` of the room raises TransferError; later chunks and receives of it are refused.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop listening; pending receives fail with TransferError."""


class KvSender(abc.ABC):
    """Prefill side: one per worker."""

    plane: str

    @abc.abstractmethod
    async def send(self, room_id: str, address: str, blocks: AsyncIterator[RowBlock],
                   first: Awaitable[FirstToken]) -> int:
        """Send the room's blocks in order as they come (prefill may still be computing later ones), then
        await `first` and send it on the last chunk (which may carry no rows); returns bytes sent.

        Blocks must be consecutive from token 0 with one (L, W, dtype); they may be any size (the sender
        cuts them into chunks). Returns once every chunk left this side; the receiver's `receive` is what
        says they all arrived. Raises TransferError when the receiver is unreachable or the send fails,
        ValueError for blocks that break the rules above. A coroutine passed as `first` is closed if the
        send fails before awaiting it.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""
