"""The room registry: rendezvous of one KV sender (prefill) and one receiver (decode) per request.

Pure asyncio, no gRPC. A room moves

    BOOTSTRAPPING -> WAITING_FOR_INPUT -> TRANSFERRING -> SUCCESS | FAILED

- `register_receiver` creates the room, or joins one a resolving sender created, and moves it to
  WAITING_FOR_INPUT; a second receiver for the same room is refused (CONFLICT).
- `resolve_receiver` creates the room (BOOTSTRAPPING) when the sender comes first, waits (bounded)
  for the receiver, checks that both KV layouts agree field by field, and moves it to TRANSFERRING.
  Disagreeing layouts fail the room (INCOMPATIBLE) before any byte moves.
- `report` ends a room: SUCCESS (the receiver, only once TRANSFERRING) or FAILED (either side).
  SUCCESS and FAILED are terminal and sticky: later reports get the terminal state back, unchanged.
- Every room has a lease (a deadline from its creation); the sweeper, and any waiter that wakes
  past it, fails the room as timed out. Ended rooms are kept `retention_s` so late calls see the
  outcome, then forgotten.
- `watch` yields a room's status now and at every change until it ends.

Every wait here is bounded by the room's lease at the latest.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import heapq
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass

from moemesh.services.kvtransfer.errors import KvTransferError, Reason
from moemesh.services.kvtransfer.waits import Notifier
from moemesh.transfer.layout import KvLayout

log = logging.getLogger(__name__)

# Waiters wake this much after a lease's deadline, so the clock has surely passed it when they check.
_LEASE_SLACK_S = 0.005


class RoomState(enum.IntEnum):
    """A room's place in the handoff; the values are the proto's `RoomState` numbers."""

    BOOTSTRAPPING = 1
    WAITING_FOR_INPUT = 2
    TRANSFERRING = 3
    SUCCESS = 4
    FAILED = 5

    @property
    def terminal(self) -> bool:
        return self in (RoomState.SUCCESS, RoomState.FAILED)


class Side(enum.Enum):
    """Which end of the handoff a caller is, when it says so."""

    SENDER = "sender"
    RECEIVER = "receiver"


@dataclass(frozen=True)
class Receiver:
    """What the decode side registered: where the room's KV goes and what it expects."""

    layout: KvLayout
    data_plane: str  # the plane's registered name ("relay"), opaque here
    address: str
    num_tokens: int
    request_id: str = ""


@dataclass(frozen=True)
class RoomStatus:
    """A room's state at one moment (what WatchRoom streams)."""

    room_id: str
    state: RoomState
    error: str = ""


# Called on every room's end (SUCCESS or FAILED), with the failure for FAILED rooms.
EndListener = Callable[[RoomStatus, "KvTransferError | None"], None]


class _Room:
    """One room's mutable record; only the registry touches it."""

    def __init__(self, room_id: str, now_s: float, lease_ms: int) -> None:
        self.room_id = room_id
        self.state = RoomState.BOOTSTRAPPING
        self.created_s = now_s
        self.lease_ms = lease_ms
        self.deadline_s = now_s + lease_ms / 1000
        self.receiver: Receiver | None = None
        self.sender_layout: KvLayout | None = None
        self.error = ""
        self.failure: KvTransferError | None = None
        self.ended_s = 0.0
        self.bytes_moved = 0
        self.changed = Notifier()
        # One status backlog per watcher, so each sees every change even if it reads slowly.
        self.watchers: list[collections.deque[RoomStatus]] = []

    def status(self) -> RoomStatus:
        return RoomStatus(self.room_id, self.state, self.error)


def _refusal(failure: KvTransferError) -> KvTransferError:
    """A fresh copy of a room's failure, so repeated raises do not pile up tracebacks on one object."""
    return KvTransferError(failure.reason, str(failure))


class RoomRegistry:
    """Every room this service knows, their state machine, leases and retention.

    `default_lease_ms` applies when a creator asks for none (0), `max_lease_ms` caps what it asks;
    likewise `default_wait_ms` / `max_wait_ms` for a resolver's wait. `clock` is monotonic seconds.
    """

    def __init__(self, *, default_lease_ms: int = 30_000, max_lease_ms: int = 600_000,
                 default_wait_ms: int = 10_000, max_wait_ms: int = 60_000, retention_s: float = 60.0,
                 max_rooms: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.default_lease_ms = default_lease_ms
        self.max_lease_ms = max_lease_ms
        self.default_wait_ms = default_wait_ms
        self.max_wait_ms = max_wait_ms
        self.retention_s = retention_s
        self.max_rooms = max_rooms
        self._clock = clock
        self._rooms: dict[str, _Room] = {}
        # Ended rooms in the order they ended: retention forgets from the front.
        self._ended: collections.OrderedDict[str, _Room] = collections.OrderedDict()
        # (deadline, tie-breaker, room): leases never change, so a heap finds the expired ones cheaply.
        self._deadlines: list[tuple[float, int, _Room]] = []
        self._seq = itertools.count()
        self._listeners: list[EndListener] = []
        self._admitting = True
        self._room_ended = Notifier()

    # -- queries ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._rooms)

    def __contains__(self, room_id: object) -> bool:
        return room_id in self._rooms

    def status(self, room_id: str) -> RoomStatus:
        """The room's status now; NOT_FOUND when unknown (never created, or forgotten)."""
        room = self._get(room_id)
        self._expire_if_due(room)
        return room.status()

    def check_state(self, room_id: str, allowed: Collection[RoomState], action: str) -> RoomStatus:
        """The room's status, when it is in one of `allowed`; else raise why not.

        A failed room raises its own failure (TIMED_OUT, ABORTED...), any other state CONFLICT.
        """
        room = self._get(room_id)
        self._expire_if_due(room)
        if room.state not in allowed:
            if room.failure is not None:
                raise _refusal(room.failure)
            raise KvTransferError(Reason.CONFLICT,
                                  f"cannot {action} room {room_id!r} in state {room.state.name}")
        return room.status()

    def lease_left_s(self, room_id: str) -> float:
        """Seconds until the room's lease runs out (0 when it has, or the room is gone)."""
        room = self._rooms.get(room_id)
        return 0.0 if room is None else max(room.deadline_s - self._clock(), 0.0)

    def on_end(self, listener: EndListener) -> None:
        """Call `listener` whenever a room ends (SUCCESS or FAILED)."""
        self._listeners.append(listener)

    # -- the handoff -----------------------------------------------------------------------------

    def register_receiver(self, room_id: str, receiver: Receiver, lease_ms: int = 0) -> RoomState:
        """The decode side registers; returns the room's state (WAITING_FOR_INPUT).

        Raises CONFLICT for a second receiver, INCOMPATIBLE when a waiting sender's layout differs
        (the room fails), the room's failure when it already ended, EXHAUSTED when full.
        """
        room = self._rooms.get(room_id)
        if room is None:
            room = self._create(room_id, lease_ms)
        else:
            self._expire_if_due(room)
            if room.receiver is not None:
                raise KvTransferError(
                    Reason.CONFLICT, f"room {room_id!r} already exists: a receiver (request "
                    f"{room.receiver.request_id!r}) registered for it")
            self._raise_if_ended(room)
        room.receiver = receiver
        if room.sender_layout is not None:
            self._check_layouts(room)
        self._set_state(room, RoomState.WAITING_FOR_INPUT)
        log.debug("room %s: receiver registered (request %s)", room_id, receiver.request_id)
        return room.state

    async def resolve_receiver(self, room_id: str, layout: KvLayout, wait_ms: int = 0,
                               lease_ms: int = 0) -> tuple[RoomState, Receiver]:
        """The prefill side asks where to send; returns (TRANSFERRING, the receiver).

        Creates the room when the receiver has not registered yet, then waits for it up to
        `wait_ms` (0: the default) and never past the room's lease. Raises TIMED_OUT when no
        receiver came in time (the room lives on until its lease ends), INCOMPATIBLE when the
        layouts differ (the room fails), the room's failure when it ended.
        """
        room = self._rooms.get(room_id)
        if room is None:
            room = self._create(room_id, lease_ms)
            log.debug("room %s: created by its sender", room_id)
        self._expire_if_due(room)
        self._raise_if_ended(room)
        room.sender_layout = layout
        waited_ms = self._bounded(wait_ms, self.default_wait_ms, self.max_wait_ms)
        give_up_s = self._clock() + waited_ms / 1000
        while room.receiver is None and not room.state.terminal:
            left_s = min(give_up_s, room.deadline_s) - self._clock()
            if left_s <= 0:
                self._expire_if_due(room)
                if room.state.terminal:
                    break
                raise KvTransferError(
                    Reason.TIMED_OUT, f"no receiver registered for room {room_id!r} within {waited_ms} ms")
            await room.changed.wait(left_s + _LEASE_SLACK_S)
        self._raise_if_ended(room)
        assert room.receiver is not None
        self._check_layouts(room)
        if room.state is RoomState.WAITING_FOR_INPUT:
            self._set_state(room, RoomState.TRANSFERRING)
        return room.state, room.receiver

    def report(self, room_id: str, state: RoomState, error: str = "", bytes_moved: int = 0,
               side: Side | None = None) -> RoomState:
        """A side reports the outcome; returns the room's state afterwards.

        SUCCESS only from the receiver (when `side` is known) and only in TRANSFERRING; FAILED from
        either side in any live state. An ended room is left as it is and its state returned.
        """
        if not state.terminal:
            raise KvTransferError(Reason.INVALID, f"a report's state is SUCCESS or FAILED, not {state.name}")
        room = self._get(room_id)
        self._expire_if_due(room)
        if room.state.terminal:
            return room.state
        if state is RoomState.SUCCESS:
            if side is Side.SENDER:
                raise KvTransferError(Reason.CONFLICT, f"room {room_id!r}: only the receiver reports SUCCESS")
            if room.state is not RoomState.TRANSFERRING:
                raise KvTransferError(
                    Reason.CONFLICT, f"room {room_id!r} cannot succeed in state {room.state.name}: "
                    "its sender has not resolved the receiver")
            room.bytes_moved = bytes_moved
            self._set_state(room, RoomState.SUCCESS)
            log.debug("room %s: SUCCESS, %d bytes", room_id, bytes_moved)
        else:
            who = "a peer" if side is None else f"the {side.value}"
            self._fail(room, KvTransferError(
                Reason.ABORTED, f"room {room_id!r}: {who} reported failure: {error or 'no reason given'}"))
        return room.state

    def fail(self, room_id: str, failure: KvTransferError) -> None:
        """End a live room as FAILED with `failure` (the relay's way to fail a room); else a no-op."""
        room = self._rooms.get(room_id)
        if room is not None:
            self._fail(room, failure)

    async def watch(self, room_id: str) -> AsyncIterator[RoomStatus]:
        """The room's status now, then at every change, ending after SUCCESS or FAILED."""
        room = self._get(room_id)
        self._expire_if_due(room)
        backlog: collections.deque[RoomStatus] = collections.deque([room.status()])
        room.watchers.append(backlog)
        try:
            while True:
                if not backlog:
                    # The lease bounds this wait: past it the room fails and the backlog fills.
                    await room.changed.wait(room.deadline_s - self._clock() + _LEASE_SLACK_S)
                    self._expire_if_due(room)
                    continue
                status = backlog.popleft()
                yield status
                if status.state.terminal:
                    return
        finally:
            room.watchers.remove(backlog)

    # -- housekeeping ----------------------------------------------------------------------------

    def expire_if_due(self, room_id: str) -> None:
        """Fail the room as timed out when its lease has run out (waiters call this as they wake)."""
        room = self._rooms.get(room_id)
        if room is not None:
            self._expire_if_due(room)

    def sweep(self) -> None:
        """Fail the rooms whose lease ran out; forget the ended ones past their retention."""
        now = self._clock()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, room = heapq.heappop(self._deadlines)
            self._expire_if_due(room)
        while self._ended:
            room = next(iter(self._ended.values()))
            if room.ended_s + self.retention_s > now:
                break
            self._forget(room)

    async def run_sweeper(self, interval_s: float) -> None:
        """Sweep every `interval_s` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.sweep()
            except Exception:
                log.exception("room sweep failed")

    def live_rooms(self) -> int:
        """Rooms not ended yet."""
        return sum(not room.state.terminal for room in self._rooms.values())

    def stop_admitting(self) -> None:
        """Refuse new rooms (SHUTTING_DOWN); the live ones go on (a draining service)."""
        self._admitting = False

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no room is live, at most `timeout_s`; False when some still are."""
        give_up_s = self._clock() + timeout_s
        while self.live_rooms():
            left_s = give_up_s - self._clock()
            if left_s <= 0:
                return False
            await self._room_ended.wait(left_s)
        return True

    def close(self, message: str = "kvtransfer is shutting down") -> None:
        """Refuse new rooms and fail every live one (waking its waiters, watchers and relay streams)."""
        self._admitting = False
        for room in list(self._rooms.values()):
            self._fail(room, KvTransferError(Reason.SHUTTING_DOWN, f"room {room.room_id!r}: {message}"))

    # -- internals -------------------------------------------------------------------------------

    def _get(self, room_id: str) -> _Room:
        room = self._rooms.get(room_id)
        if room is None:
            raise KvTransferError(Reason.NOT_FOUND, f"no room {room_id!r} (never created, or ended and forgotten)")
        return room

    @staticmethod
    def _bounded(asked_ms: int, default_ms: int, max_ms: int) -> int:
        return min(asked_ms or default_ms, max_ms)

    def _create(self, room_id: str, lease_ms: int) -> _Room:
        if not self._admitting:
            raise KvTransferError(Reason.SHUTTING_DOWN, "kvtransfer is shutting down: no new rooms")
        if len(self._rooms) >= self.max_rooms and self._ended:
            # Ended rooms are only kept as a courtesy to late callers; live ones come first.
            self._forget(next(iter(self._ended.values())))
        if len(self._rooms) >= self.max_rooms:
            raise KvTransferError(
                Reason.EXHAUSTED, f"kvtransfer holds {len(self._rooms)} live rooms, its limit (max_rooms)")
        room = _Room(room_id, self._clock(), self._bounded(lease_ms, self.default_lease_ms, self.max_lease_ms))
        self._rooms[room_id] = room
        heapq.heappush(self._deadlines, (room.deadline_s, next(self._seq), room))
        return room

    def _forget(self, room: _Room) -> None:
        self._ended.pop(room.room_id, None)
        if self._rooms.get(room.room_id) is room:
            del self._rooms[room.room_id]

    def _raise_if_ended(self, room: _Room) -> None:
        if room.failure is not None:
            raise _refusal(room.failure)
        if room.state is RoomState.SUCCESS:
            raise KvTransferError(Reason.CONFLICT, f"room {room.room_id!r} already ended in SUCCESS")

    def _check_layouts(self, room: _Room) -> None:
        assert room.receiver is not None and room.sender_layout is not None
        diffs = room.sender_layout.differences(room.receiver.layout)
        if diffs:
            failure = KvTransferError(
                Reason.INCOMPATIBLE,
                f"room {room.room_id!r}: sender and receiver KV layouts differ: {'; '.join(diffs)}")
            self._fail(room, failure)
            raise _refusal(failure)

    def _expire_if_due(self, room: _Room) -> None:
        now = self._clock()
        if not room.state.terminal and now >= room.deadline_s:
            elapsed_ms = round((now - room.created_s) * 1000)
            self._fail(room, KvTransferError(
                Reason.TIMED_OUT, f"room {room.room_id!r} timed out in state {room.state.name} after "
                f"{elapsed_ms} ms (lease {room.lease_ms} ms)"))

    def _fail(self, room: _Room, failure: KvTransferError) -> None:
        if room.state.terminal:
            return
        room.failure = failure
        room.error = str(failure)
        log.info("%s", failure)
        self._set_state(room, RoomState.FAILED)

    def _set_state(self, room: _Room, state: RoomState) -> None:
        room.state = state
        status = room.status()
        for backlog in room.watchers:
            backlog.append(status)
        if state.terminal:
            room.ended_s = self._clock()
            self._ended[room.room_id] = room
        room.changed.notify()
        if state.terminal:
            self._room_ended.notify()
            for listener in self._listeners:
                try:
                    listener(status, room.failure)
                except Exception:
                    log.exception("room end listener failed")
