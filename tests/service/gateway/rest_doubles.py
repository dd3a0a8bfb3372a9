"""Helpers for the REST facade's tests: a test gateway serving REST on 127.0.0.1:0 and an HTTP client.

The gateway is the real one (`start_gateway` with `http_port=0`: uvicorn on the gateway's event loop),
its workers the loopback fakes of `test_gateway_doubles`. This module holds no tests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.service.gateway.doubles import Mesh


@asynccontextmanager
async def rest_mesh(model_dir: Path, **gateway_overrides: Any) -> AsyncIterator[tuple[Mesh, httpx.AsyncClient]]:
    """A test gateway with REST on a free port, and a client for it (no proxies from the environment)."""
    async with Mesh(model_dir, http_port=0, **gateway_overrides) as mesh:
        async with httpx.AsyncClient(base_url=f"http://{mesh.app.http_address}", trust_env=False,
                                     timeout=20) as client:
            yield mesh, client


def sse_events(body: str) -> list[Any]:
    """The `data:` payloads of an event stream, JSON-decoded (`[DONE]` stays a string)."""
    assert body.endswith("\n\n"), body[-80:]
    events = []
    for block in body.strip("\n").split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The OpenAI error object of `response`, checking its status and shape."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"], body
    return body["error"]
