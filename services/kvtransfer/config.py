"""kvtransfer's settings: one frozen dataclass, checked when built."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KvTransferConfig:
    """Everything `moemesh serve kvtransfer` can be told (flags or `MOEMESH_<FIELD>` variables)."""

    # Where the gRPC server listens; port 0 picks a free one.
    host: str = "127.0.0.1"
    port: int = 50060
    # A room's lease when its creator asks for none (lease_ms 0), and the most any creator gets.
    default_lease_ms: int = 30_000
    max_lease_ms: int = 600_000
    # How long ResolveReceiver waits for the receiver when the request says 0, and at most.
    default_wait_ms: int = 10_000
    max_wait_ms: int = 60_000
    # Ended rooms are kept this long so late reports and watches see the outcome.
    retention_s: float = 60.0
    # Rooms held at once (live plus retained); a new room past it is refused unless a retained one can go.
    max_rooms: int = 10_000
    # Relay: chunks and bytes buffered per room before a push waits, and bytes over all rooms.
    relay_queue_chunks: int = 16
    relay_room_max_bytes: int = 256 * 2**20
    relay_total_max_bytes: int = 1024 * 2**20
    # How often expired leases are failed and retained rooms forgotten (waiters also check on waking).
    sweep_interval_s: float = 0.5
    # On stop: how long live rooms may still finish (health NOT_SERVING, no new rooms; stop goes on as
    # soon as none is live), then how long in-flight calls get before they are cancelled.
    drain_s: float = 5.0
    shutdown_grace_s: float = 5.0

    def __post_init__(self) -> None:
        problems = []
        if not self.host:
            problems.append("host is empty")
        if not 0 <= self.port <= 65535:
            problems.append(f"port {self.port} is not in [0, 65535]")
        for name in ("default_lease_ms", "max_lease_ms", "default_wait_ms", "max_wait_ms", "max_rooms",
                     "relay_queue_chunks", "relay_room_max_bytes", "relay_total_max_bytes"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.default_lease_ms > self.max_lease_ms:
            problems.append(f"default_lease_ms {self.default_lease_ms} exceeds max_lease_ms {self.max_lease_ms}")
        if self.default_wait_ms > self.max_wait_ms:
            problems.append(f"default_wait_ms {self.default_wait_ms} exceeds max_wait_ms {self.max_wait_ms}")
        if self.relay_room_max_bytes > self.relay_total_max_bytes:
            problems.append(f"relay_room_max_bytes {self.relay_room_max_bytes} exceeds relay_total_max_bytes "
                            f"{self.relay_total_max_bytes}")
        if self.retention_s < 0:
            problems.append(f"retention_s must not be negative, not {self.retention_s}")
        if self.sweep_interval_s <= 0:
            problems.append(f"sweep_interval_s must be positive, not {self.sweep_interval_s}")
        for name in ("drain_s", "shutdown_grace_s"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, not {getattr(self, name)}")
        if problems:
            raise ValueError("invalid kvtransfer config: " + "; ".join(problems))
