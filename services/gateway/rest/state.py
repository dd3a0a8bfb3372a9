"""What every REST handler reaches through `request.app.state.rest`."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request

from moemesh.service.errors import Unavailable
from moemesh.services.gateway.core import GatewayCore
from moemesh.services.gateway.rest.generation import Generation
from moemesh.services.gateway.rest.logprobs import TokenTexts
from moemesh.services.gateway.rest.metrics import Exposition
from moemesh.services.gateway.rest.unknown_fields import UnknownFields


@dataclass
class RestState:
    core: GatewayCore
    metrics: Exposition
    texts: TokenTexts = field(init=False)
    started: int = field(default_factory=lambda: int(time.time()))
    active: set[Generation] = field(default_factory=set)  # calls in progress
    unknown_fields: UnknownFields = field(default_factory=UnknownFields)
    draining: bool = False  # the gateway is stopping: new calls get 503, the open ones run on (drain.py)

    def __post_init__(self) -> None:
        self.texts = TokenTexts(self.core.model.tokenizer)

    @property
    def model_name(self) -> str:
        return self.core.model.name

    def generation(self, per_prompt: int = 1) -> Generation:
        """A new call's Generation, tracked until it closes."""
        return Generation(self.core, per_prompt, self.active)

    def abort_all(self, message: str = "the gateway is shutting down") -> None:
        """End every call in progress now with UNAVAILABLE (streams get an error event, then [DONE])."""
        for gen in list(self.active):
            gen.abort(Unavailable(message))


def rest_state(request: Request) -> RestState:
    return request.app.state.rest


def new_id(prefix: str) -> str:
    """An OpenAI-style object id: `cmpl-...`, `chatcmpl-...`."""
    return f"{prefix}-{uuid.uuid4().hex}"
