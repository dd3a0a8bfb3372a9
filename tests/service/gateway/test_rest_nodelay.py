"""The REST facade's connections send at once (TCP_NODELAY): without it, a kept-alive connection's responses,
which h11 writes as a head and a body, waited ~40 ms each for the client's delayed ACK (as did streamed chunks)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from tests.service.gateway.doubles import FakeDecode, make_tokenizer_dir
from tests.service.gateway.rest_doubles import rest_mesh


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("rest-nodelay") / "tok")


def test_kept_alive_connections_have_nodelay(model_dir: Path) -> None:
    async def main() -> list[int]:
        async with rest_mesh(model_dir) as (mesh, client):
            await mesh.add(FakeDecode(), "d1")
            for _ in range(3):  # one connection, kept alive between the requests
                assert (await client.get("/v1/models")).status_code == 200
                r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                assert r.status_code == 200, r.text
            connections = mesh.app.http._server.server_state.connections  # uvicorn's open connections
            return [c.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                    for c in connections]

    flags = asyncio.run(main())
    assert len(flags) == 1, flags  # the client's one kept-alive connection
    assert flags[0] != 0
