"""The gateway's configuration: one frozen dataclass, validated when it is built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The embedded tiny model has no folder name worth showing to clients.
DEFAULT_MODEL_NAME = "moemesh-tiny"


@dataclass(frozen=True)
class GatewayConfig:
    """How one gateway process runs.

    `model_dir` None serves the embedded tiny model (its folder is created on first use);
    `model_name` None names the model after its folder (or `moemesh-tiny` for the embedded one);
    `max_model_len` None takes the model folder's own context limit.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    model_dir: str | None = None
    model_name: str | None = None
    heartbeat_interval_ms: int = 1000
    heartbeat_timeout_ms: int = 5000
    default_request_timeout_s: float = 600.0
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.heartbeat_interval_ms <= 0:
            raise ValueError(f"heartbeat_interval_ms must be > 0, got {self.heartbeat_interval_ms}")
        if self.heartbeat_timeout_ms <= self.heartbeat_interval_ms:
            raise ValueError(
                f"heartbeat_timeout_ms ({self.heartbeat_timeout_ms}) must exceed heartbeat_interval_ms "
                f"({self.heartbeat_interval_ms}), or every worker is dropped between two heartbeats")
        if not self.default_request_timeout_s > 0:
            raise ValueError(f"default_request_timeout_s must be > 0, got {self.default_request_timeout_s}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be > 0, got {self.max_model_len}")
        if self.model_name is not None and not self.model_name.strip():
            raise ValueError("model_name must not be blank")

    @property
    def served_model_name(self) -> str:
        """The name clients use in `GenerateRequest.model` and that workers must register with."""
        if self.model_name:
            return self.model_name
        return Path(self.model_dir).resolve().name if self.model_dir else DEFAULT_MODEL_NAME
