"""The worker registry: which prefill and decode workers are alive, their load, and a channel to each.

Workers join with Register (their protocol version is checked), keep their entry alive with Heartbeat
(which also reports load and draining) and leave with Deregister. A sweeper drops workers silent for
longer than the heartbeat timeout. A Heartbeat from an unknown worker answers known=false, so a worker
re-registers after the gateway restarted or dropped it.

A removed entry's channel is closed only once the gateway has no request in flight on it: Deregister
promises that in-flight requests still finish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from moemesh.service.channel import CHANNEL_OPTIONS, mesh_channel
from moemesh.service.errors import FailedPrecondition, InvalidArgument
from moemesh.service.version import PROTOCOL_VERSION, check_protocol_version
from moemesh.v1 import common_pb2, decode_pb2_grpc, gateway_pb2, prefill_pb2_grpc

log = logging.getLogger(__name__)

DECODE = common_pb2.WORKER_ROLE_DECODE
PREFILL = common_pb2.WORKER_ROLE_PREFILL

# gRPC waits up to two minutes between reconnect attempts by default; a worker that comes back should
# be usable within seconds of its next heartbeat.
WORKER_CHANNEL_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]

_ROLE_NAMES = {DECODE: "decode", PREFILL: "prefill"}


def role_name(role: int) -> str:
    """"decode" or "prefill" (for messages)."""
    return _ROLE_NAMES.get(role, f"role {role}")


@dataclass(eq=False)
class WorkerEntry:
    """One registered worker: what it said of itself, what the gateway observed, and its channel."""

    worker_id: str
    role: int
    address: str
    instance_id: str = ""
    dp_rank: int = 0
    dp_size: int = 1
    model_name: str = ""
    kv_layout: common_pb2.KvLayout = field(default_factory=common_pb2.KvLayout)
    load: common_pb2.WorkerLoad = field(default_factory=common_pb2.WorkerLoad)
    max_model_len: int = 0
    draining: bool = False
    # False after an RPC to it failed with UNAVAILABLE; a fresh heartbeat sets it back.
    healthy: bool = True
    last_seen: float = 0.0
    # Requests this gateway has in flight on the worker (its load report lags behind them).
    in_flight: int = 0
    # KV pages requests sent since the last heartbeat will take: the reported free pages predate them.
    pending_pages: int = 0
    removed: bool = False
    _channel: grpc.aio.Channel | None = None
    _stub: Any = None

    def __repr__(self) -> str:
        return f"WorkerEntry({self.name}, routable={self.routable}, in_flight={self.in_flight})"

    @property
    def routable(self) -> bool:
        """True when new requests may be sent to it."""
        return self.healthy and not self.draining and not self.removed

    @property
    def queue_len(self) -> int:
        """Requests queued or running on it, counting those sent since its last report."""
        return self.load.num_waiting_requests + self.load.num_running_requests + self.in_flight

    @property
    def free_pages(self) -> int:
        """Free KV pages it reported, less those the requests sent since then will take."""
        return self.load.num_free_pages - self.pending_pages

    @property
    def name(self) -> str:
        """How messages name it: role, id and address."""
        return f"{role_name(self.role)} worker {self.worker_id} at {self.address}"

    def stub(self) -> Any:
        """Its Decode or Prefill stub, over a channel opened on first use (inside the event loop)."""
        if self._stub is None:
            self._channel = mesh_channel(self.address, options=WORKER_CHANNEL_OPTIONS)
            stub_class = decode_pb2_grpc.DecodeStub if self.role == DECODE else prefill_pb2_grpc.PrefillStub
            self._stub = stub_class(self._channel)
        return self._stub

    def close_channel(self, tasks: set[asyncio.Task[Any]]) -> None:
        """Close its channel in the background; `tasks` keeps the closing task alive until it ends."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is None:
            return
        try:
            task = asyncio.get_running_loop().create_task(channel.close())
        except RuntimeError:
            return  # no loop left: the process is exiting and takes the channel with it
        tasks.add(task)
        task.add_done_callback(tasks.discard)


class WorkerRegistry:
    """The registered workers of one served model, keyed by worker id."""

    def __init__(self, model_name: str, heartbeat_interval_ms: int = 1000, heartbeat_timeout_ms: int = 5000,
                 clock: Callable[[], float] = time.monotonic, model_aliases: Sequence[str] = ()) -> None:
        """`model_name` (or one of `model_aliases`, e.g. the model folder's name): what workers must
        register with, or leave empty; `clock` in seconds."""
        self.model_name = model_name
        self.model_names = {model_name, *model_aliases}
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        self._clock = clock
        self._workers: dict[str, WorkerEntry] = {}
        self._closing: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    # -- the WorkerRegistry RPCs

    def register(self, req: gateway_pb2.RegisterWorkerRequest) -> gateway_pb2.RegisterWorkerResponse:
        """Add (or replace) a worker; raises InvalidArgument/FailedPrecondition naming the bad field."""
        who = f"worker {req.worker_id or '(no id)'} at {req.address or '(no address)'}"
        check_protocol_version(req.protocol_version, who)
        if not req.worker_id:
            raise InvalidArgument(f"{who}: worker_id must not be empty")
        if not req.address:
            raise InvalidArgument(f"{who}: address must not be empty")
        if req.role not in _ROLE_NAMES:
            raise InvalidArgument(f"{who}: role must be WORKER_ROLE_PREFILL or WORKER_ROLE_DECODE")
        if req.model_name and req.model_name not in self.model_names:
            raise FailedPrecondition(
                f"{who} serves model {req.model_name!r}, this gateway serves {self.model_name!r}")
        old = self._workers.get(req.worker_id)
        if old is not None:
            # A fresh channel: the old one may sit in reconnect backoff after the worker restarted.
            self._remove(old, "re-registered")
        entry = WorkerEntry(
            worker_id=req.worker_id, role=req.role, address=req.address, instance_id=req.instance_id,
            dp_rank=req.dp_rank, dp_size=max(req.dp_size, 1), model_name=req.model_name,
            kv_layout=_copy(req.kv_layout), load=_copy(req.load), max_model_len=req.max_model_len,
            last_seen=self._clock())
        self._workers[entry.worker_id] = entry
        log.info("registered %s (instance %s, dp rank %d)", entry.name, entry.instance_id, entry.dp_rank)
        return gateway_pb2.RegisterWorkerResponse(
            protocol_version=PROTOCOL_VERSION, heartbeat_interval_ms=self.heartbeat_interval_ms,
            heartbeat_timeout_ms=self.heartbeat_timeout_ms)

    def heartbeat(self, req: gateway_pb2.HeartbeatRequest) -> gateway_pb2.HeartbeatResponse:
        """Refresh a worker's load, draining flag and health; known=false asks it to register again."""
        entry = self._workers.get(req.worker_id)
        if entry is None:
            return gateway_pb2.HeartbeatResponse(known=False)
        entry.load = _copy(req.load)
        entry.pending_pages = 0
        entry.last_seen = self._clock()
        if entry.draining != req.draining:
            log.info("%s %s", entry.name, "is draining" if req.draining else "stopped draining")
        entry.draining = req.draining
        if not entry.healthy:
            log.info("%s is healthy again", entry.name)
        entry.healthy = True
        return gateway_pb2.HeartbeatResponse(known=True)

    def deregister(self, req: gateway_pb2.DeregisterWorkerRequest) -> gateway_pb2.DeregisterWorkerResponse:
        """Remove a worker; requests in flight on it still finish."""
        entry = self._workers.get(req.worker_id)
        if entry is None:
            return gateway_pb2.DeregisterWorkerResponse(removed=False)
        self._remove(entry, "deregistered")
        return gateway_pb2.DeregisterWorkerResponse(removed=True)

    # -- queries and bookkeeping for the router and the request lifecycle

    def workers(self, role: int | None = None) -> list[WorkerEntry]:
        """Registered workers (of one role), in registration order."""
        return [w for w in self._workers.values() if role is None or w.role == role]

    def get(self, worker_id: str) -> WorkerEntry | None:
        return self._workers.get(worker_id)

    def has_decode_workers(self) -> bool:
        """Readiness hook: True once a decode worker could take a request."""
        return any(w.routable for w in self.workers(DECODE))

    def mark_unhealthy(self, entry: WorkerEntry, why: str) -> None:
        """Stop routing to `entry` until its next heartbeat (an RPC to it failed with UNAVAILABLE)."""
        if entry.healthy:
            log.warning("%s marked unhealthy: %s", entry.name, why)
        entry.healthy = False

    def acquire(self, entry: WorkerEntry, pages: int = 0) -> None:
        """Count one more request in flight on `entry`, taking about `pages` of its KV pages."""
        entry.in_flight += 1
        entry.pending_pages += pages

    def release(self, entry: WorkerEntry) -> None:
        """The request counted by `acquire` ended; closes a removed entry's channel when it was the last."""
        entry.in_flight = max(entry.in_flight - 1, 0)
        if entry.removed and entry.in_flight == 0:
            entry.close_channel(self._closing)

    # -- liveness

    def sweep(self) -> list[WorkerEntry]:
        """Drop workers silent for longer than the heartbeat timeout; returns them."""
        deadline = self._clock() - self.heartbeat_timeout_ms / 1000
        silent = [w for w in self._workers.values() if w.last_seen < deadline]
        for entry in silent:
            self._remove(entry, f"silent for more than {self.heartbeat_timeout_ms} ms")
        return silent

    def start(self) -> None:
        """Run the sweeper in the background (call inside the event loop)."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def close(self) -> None:
        """Stop the sweeper and close every channel."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        for entry in list(self._workers.values()):
            self._remove(entry, "gateway stopping")
        for entry_task in list(self._closing):
            await asyncio.gather(entry_task, return_exceptions=True)

    async def _sweep_forever(self) -> None:
        # Checking twice per interval bounds how late a drop is without waking up needlessly often.
        period_s = self.heartbeat_interval_ms / 2000
        while True:
            await asyncio.sleep(period_s)
            self.sweep()

    def _remove(self, entry: WorkerEntry, why: str) -> None:
        if self._workers.get(entry.worker_id) is entry:
            del self._workers[entry.worker_id]
        entry.removed = True
        log.info("removed %s: %s", entry.name, why)
        if entry.in_flight == 0:
            entry.close_channel(self._closing)


def _copy(message: Any) -> Any:
    out = type(message)()
    out.CopyFrom(message)
    return out
