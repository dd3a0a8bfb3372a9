"""The gateway's OpenAI-compatible REST facade (FastAPI), served by uvicorn in the gateway's own process.

`create_app(core, api_key)` builds the app over a `GatewayCore` (no gRPC hop); `HttpServer` runs it
on the gateway's event loop, next to the gRPC server; `rest_server(core, host, port, api_key)` is both.
Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics.
"""

from moemesh.services.gateway.rest.app import create_app
from moemesh.services.gateway.rest.server import HttpServer, rest_server, rest_state_of

__all__ = ["HttpServer", "create_app", "rest_server", "rest_state_of"]
