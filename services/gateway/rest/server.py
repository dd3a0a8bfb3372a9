"""uvicorn on the gateway's own event loop, next to the gRPC server (one process, one loop).

The socket is bound here, so a busy port fails `start()` with an OSError naming it (and port 0 is
resolved before anyone is told the address). Signals stay the gateway's: uvicorn does not install
its own handlers here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator

import uvicorn
from fastapi import FastAPI

from moemesh.services.gateway.core import GatewayCore
from moemesh.services.gateway.rest.app import create_app
from moemesh.services.gateway.rest.state import RestState
from moemesh.telemetry import metrics_exposition

# After the grace period, open calls are ended with an error; uvicorn cancels what is left this much later.
CANCEL_AFTER_ABORT_S = 1.0


def rest_state_of(app: FastAPI) -> RestState:
    return app.state.rest


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The gateway's own handlers stop it, and stop() stops this server.
        yield


class HttpServer:
    """Serve `app` on host:port (0 picks a free port); `start()`, then `stop(grace_s)`.

    `on_grace_expired` is called when calls are still open at the end of the grace period (the REST
    app ends them with an error, so streams close cleanly); uvicorn cancels what remains after that.
    """

    def __init__(self, app: FastAPI, host: str, port: int, on_grace_expired: Callable[[], None] | None = None) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.on_grace_expired = on_grace_expired
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        """host:port clients call (the bound port when 0 was asked for)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        sock = self._bind()
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=False, ws="none",
                                timeout_graceful_shutdown=5)
        self._server = _EmbeddedServer(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError(f"the HTTP server on {self.address} stopped while starting")
            await asyncio.sleep(0.01)

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections of a socket that names its protocol,
        # and without it a kept-alive connection's response (h11 writes head and body apart) waits ~40 ms for
        # the client's delayed ACK, as would every streamed chunk after the first.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen for HTTP on {self.address}: {exc.strerror}") from None
        return sock

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting; streams still open get `grace_s` to finish, then are cancelled."""
        server, task = self._server, self._task
        if server is None or task is None:
            return
        # Held here, not re-read from self: a second stop (a drain's, while its caller stops too) clears them.
        grace_s = max(grace_s, 0.0)
        server.config.timeout_graceful_shutdown = grace_s + CANCEL_AFTER_ABORT_S
        server.should_exit = True
        try:
            done, _ = await asyncio.wait({task}, timeout=grace_s)
            if not done and self.on_grace_expired is not None:
                self.on_grace_expired()
            await task
        finally:
            self._server = self._task = None


def rest_server(core: GatewayCore, host: str, port: int, api_key: str | None = None) -> HttpServer:
    """The REST facade of `core` on host:port, ending open calls cleanly when it stops."""
    app = create_app(core, api_key=api_key, metrics=metrics_exposition)
    return HttpServer(app, host, port, on_grace_expired=rest_state_of(app).abort_all)
