"""The gateway's configuration: one frozen dataclass, validated when it is built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from moemesh.services.gateway.admission import AdmissionConfig
from moemesh.services.gateway.chat_output import REASONING_PARSER_CHOICES, TOOL_CALL_PARSER_CHOICES
from moemesh.services.gateway.routers import DEFAULT_ROUTER, ROUTERS

# The embedded tiny model has no folder name worth showing to clients.
DEFAULT_MODEL_NAME = "moemesh-tiny"


@dataclass(frozen=True)
class GatewayConfig:
    """How one gateway process runs.

    `model_dir` None serves the embedded tiny model (its folder is created on first use);
    `model_name` None names the model after its folder (or `moemesh-tiny` for the embedded one);
    `max_model_len` None takes the model folder's own context limit.
    `tool_call_parser` / `reasoning_parser`: how chat outputs are split (a registered parser, "auto":
    detected from the tokenizer, "none"); `chat_template`: a template file (or a template moemesh ships,
    by name) replacing the model's.
    `http_port` is the OpenAI-compatible REST facade's port (0 picks one; None serves no REST, the
    default here so embedded and test gateways bind nothing unasked; `moemesh serve gateway` defaults
    to 8000); `api_key`, when set, is the bearer key every `/v1/...` REST call must present.
    `drain_timeout_s`: after SIGTERM, how long requests in flight may run on to their end while new ones are
    refused (REST 503, gRPC UNAVAILABLE, health NOT_SERVING); what is still open then ends with an error.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    model_dir: str | None = None
    model_name: str | None = None
    heartbeat_interval_ms: int = 1000
    heartbeat_timeout_ms: int = 5000
    default_request_timeout_s: float = 600.0
    max_model_len: int | None = None
    http_port: int | None = None
    api_key: str | None = field(default=None, repr=False)  # a secret: kept out of logs
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    kvtransfer: str | None = None  # watched: while it is away, requests run colocated (None: not watched)
    max_migrations: int = 2        # times one request may move on after the workers serving it failed
    router: str = DEFAULT_ROUTER   # the routing policy, a name registered in routers.py
    tool_call_parser: str = "auto"
    reasoning_parser: str = "auto"
    chat_template: str | None = None
    # Below Kubernetes' default terminationGracePeriodSeconds (30, as deploy/k8s gives the gateway): the
    # streams still open at the deadline must get their error event before the SIGKILL.
    drain_timeout_s: float = 25.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in [0, 65535] (or None: no REST), got {self.http_port}")
        if self.http_port is not None and self.http_port != 0 and self.http_port == self.port:
            raise ValueError(f"http_port and port must differ, both are {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be blank (leave it unset to serve REST without a key)")
        if self.heartbeat_interval_ms <= 0:
            raise ValueError(f"heartbeat_interval_ms must be > 0, got {self.heartbeat_interval_ms}")
        if self.heartbeat_timeout_ms <= self.heartbeat_interval_ms:
            raise ValueError(
                f"heartbeat_timeout_ms ({self.heartbeat_timeout_ms}) must exceed heartbeat_interval_ms "
                f"({self.heartbeat_interval_ms}), or every worker is dropped between two heartbeats")
        if not self.default_request_timeout_s > 0:
            raise ValueError(f"default_request_timeout_s must be > 0, got {self.default_request_timeout_s}")
        if not 0 <= self.drain_timeout_s < math.inf:  # NaN fails too
            raise ValueError(f"drain_timeout_s must be a finite number >= 0, got {self.drain_timeout_s}")
        if self.max_migrations < 0:
            raise ValueError(f"max_migrations must be >= 0, got {self.max_migrations}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be > 0, got {self.max_model_len}")
        if self.model_name is not None and not self.model_name.strip():
            raise ValueError("model_name must not be blank")
        if self.tool_call_parser not in TOOL_CALL_PARSER_CHOICES:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSER_CHOICES)}, "
                             f"got {self.tool_call_parser!r}")
        if self.reasoning_parser not in REASONING_PARSER_CHOICES:
            raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSER_CHOICES)}, "
                             f"got {self.reasoning_parser!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")

    @property
    def served_model_name(self) -> str:
        """The name clients use in `GenerateRequest.model` and that workers must register with."""
        if self.model_name:
            return self.model_name
        return Path(self.model_dir).resolve().name if self.model_dir else DEFAULT_MODEL_NAME
