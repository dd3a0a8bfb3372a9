"""Fault injection in the KV data planes: drop, delay or corrupt chunks where a sender sends them.

Off by default. Set `MOEMESH_FAULT_KV` in the environment of the process that sends KV (the prefill
worker) to turn it on, for chaos tests and soak runs:

    MOEMESH_FAULT_KV="drop=0.1,delay_ms=50,corrupt=0.05,seed=1"

    drop      probability in [0, 1] that a chunk is never sent
    corrupt   probability in [0, 1] that a chunk is sent with one data byte flipped and its checksum kept
              (a row-less chunk gets its checksum flipped instead), as a bad link would deliver it
    delay_ms  milliseconds every chunk waits before it goes out (>= 0)
    seed      seeds the sender's draws (an integer, default 0), so a run's faults repeat

Unset keys are 0; drop + corrupt must not exceed 1. The variable is read once per process, when
`moemesh.transfer.registry` is first imported (a worker's start-up): a malformed value raises ValueError
there, naming the variable, never on the first transfer. Every plane's sender (inproc, relay, ucx) passes
its chunks through `FaultInjector.wrap`, so the faults hit every plane alike.

What the receiver sees: a corrupt chunk fails its CRC-32 check (`decode_chunk`), so the room's `receive`
raises TransferError("... checksum mismatch ...") and nothing of that chunk is written. A dropped chunk
leaves a gap the next chunk reveals ("gap: got chunk i+1, expected i"), or, when it was the last one, the
receive times out (bounded by the room's lease). The planes are one-way streams with no resend, so a
room with a bad chunk is failed cleanly, never retried inside the plane; the request gets the error
(the decode worker reports the room FAILED and answers UNAVAILABLE), and retrying is the gateway's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import numpy as np

from moemesh.transfer.chunk import EncodedChunk

log = logging.getLogger(__name__)

ENV = "MOEMESH_FAULT_KV"
_KEYS = ("drop", "corrupt", "delay_ms", "seed")


@dataclass(frozen=True)
class KvFaults:
    """What to inject: per-chunk probabilities of dropping and corrupting, a delay, and the seed."""

    drop: float = 0.0
    corrupt: float = 0.0
    delay_ms: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("drop", "corrupt"):
            p = getattr(self, name)
            if not (math.isfinite(p) and 0.0 <= p <= 1.0):
                raise ValueError(f"{ENV}: {name} must be a probability in [0, 1], not {p}")
        if self.drop + self.corrupt > 1.0:
            raise ValueError(f"{ENV}: drop + corrupt must not exceed 1 (got {self.drop} + {self.corrupt})")
        if not (math.isfinite(self.delay_ms) and self.delay_ms >= 0):
            raise ValueError(f"{ENV}: delay_ms must be >= 0, not {self.delay_ms}")

    @property
    def active(self) -> bool:
        return self.drop > 0 or self.corrupt > 0 or self.delay_ms > 0

    @classmethod
    def parse(cls, spec: str) -> KvFaults:
        """`"drop=0.1,delay_ms=50,corrupt=0.05,seed=1"` -> KvFaults; ValueError naming the bad part."""
        values: dict[str, float | int] = {}
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            key, sep, raw = part.partition("=")
            key, raw = key.strip(), raw.strip()
            if not sep or not raw:
                raise ValueError(f"{ENV}={spec!r}: {part!r} is not KEY=VALUE (keys: {', '.join(_KEYS)})")
            if key not in _KEYS:
                raise ValueError(f"{ENV}={spec!r}: unknown key {key!r} (keys: {', '.join(_KEYS)})")
            if key in values:
                raise ValueError(f"{ENV}={spec!r}: {key} is given twice")
            try:
                values[key] = int(raw) if key == "seed" else float(raw)
            except ValueError:
                kind = "an integer" if key == "seed" else "a number"
                raise ValueError(f"{ENV}={spec!r}: {key} must be {kind}, not {raw!r}") from None
        return cls(**values)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"drop={self.drop:g},corrupt={self.corrupt:g},delay_ms={self.delay_ms:g},seed={self.seed}"


def from_env(environ: Mapping[str, str] | None = None) -> KvFaults | None:
    """The faults `MOEMESH_FAULT_KV` asks for; None when unset, empty or all zero (injection off)."""
    spec = (os.environ if environ is None else environ).get(ENV, "")
    if not spec.strip():
        return None
    faults = KvFaults.parse(spec)
    return faults if faults.active else None


_configured: KvFaults | None = None
_read = False


def configured() -> KvFaults | None:
    """This process's faults: `MOEMESH_FAULT_KV`, parsed on the first call and kept (read once)."""
    global _configured, _read
    if not _read:
        faults = from_env()  # raises before _read is set: a bad value fails every call, not just the first
        if faults is not None:
            log.warning("KV fault injection is ON (%s=%s): chunks sent from this process may be dropped, "
                        "delayed or corrupted", ENV, faults)
        _configured, _read = faults, True
    return _configured


def reload() -> KvFaults | None:
    """Read the variable again (tests that change it); senders built afterwards use the new value."""
    global _read
    _read = False
    return configured()


class FaultInjector:
    """One sender's faults, with its own seeded generator and counts of what it injected."""

    def __init__(self, faults: KvFaults) -> None:
        self.faults = faults
        self._rng = random.Random(faults.seed)
        self.sent = self.dropped = self.corrupted = 0

    @classmethod
    def for_sender(cls, faults: KvFaults | None = None) -> FaultInjector | None:
        """An injector for a new sender: `faults`, else the process's configured ones; None when off."""
        faults = faults if faults is not None else configured()
        return cls(faults) if faults is not None and faults.active else None

    async def wrap(self, chunks: AsyncIterator[EncodedChunk]) -> AsyncIterator[EncodedChunk]:
        """`chunks` as a faulty link would pass them on (closing this closes `chunks`)."""
        f = self.faults
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            async for chunk in chunks:
                if f.delay_ms:
                    await asyncio.sleep(f.delay_ms / 1000)
                draw = self._rng.random()
                where = f"room {chunk.header.room_id!r} chunk {chunk.header.chunk_index}"
                if draw < f.drop:
                    self.dropped += 1
                    log.info("fault injection: dropping %s", where)
                    continue
                if draw < f.drop + f.corrupt:
                    self.corrupted += 1
                    log.info("fault injection: corrupting %s", where)
                    chunk = self._corrupt(chunk)
                self.sent += 1
                yield chunk

    def _corrupt(self, chunk: EncodedChunk) -> EncodedChunk:
        # A copy: the original bytes may be a view of the sender's own KV pages.
        header = type(chunk.header)()
        header.CopyFrom(chunk.header)
        if chunk.nbytes == 0:
            header.checksum_crc32 ^= 1 << self._rng.randrange(32)
            return EncodedChunk(header, chunk.data)
        data = np.array(chunk.data, dtype=np.uint8, copy=True)
        data[self._rng.randrange(data.size)] ^= 0xFF
        return EncodedChunk(header, data)
