"""Start the gateway: `moemesh serve gateway ...`, or `serve(cfg)` / `start_gateway(cfg)` from Python."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from moemesh.model.tokenizer import TokenizerError
from moemesh.service.auth import ApiKeyInterceptor, ApiKeys, parse_api_keys
from moemesh.service.config import apply_env_defaults
from moemesh.service.heap import run_settled
from moemesh.service.server import GrpcServer, announce, install_signal_handlers
from moemesh.service.tls import add_tls_arguments, configure_tls_from_args
from moemesh.services.gateway.admission import Admission, add_admission_arguments, admission_config
from moemesh.services.gateway.chat_output import REASONING_PARSER_CHOICES, TOOL_CALL_PARSER_CHOICES
from moemesh.services.gateway.config import GatewayConfig
from moemesh.services.gateway.core import GatewayCore
from moemesh.services.gateway.model import ServedModel, load_served_model
from moemesh.services.gateway.pd_health import KvTransferHealth
from moemesh.services.gateway.registry import DECODE, WorkerRegistry
from moemesh.services.gateway.rest import HttpServer, rest_server, rest_state_of
from moemesh.services.gateway.rest.drain import DRAINING_MESSAGE
from moemesh.services.gateway.router import make_router
from moemesh.services.gateway.routers import ROUTERS
from moemesh.services.gateway.servicer import GatewayServicer, WorkerRegistryServicer
from moemesh.telemetry import add_telemetry_arguments, announce_metrics, setup_telemetry
from moemesh.telemetry.readiness import HTTP
from moemesh.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)

GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
REGISTRY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["WorkerRegistry"].full_name
EXIT_USAGE = 2
DEFAULT_HTTP_PORT = 8000
# How often a drain looks at the requests in flight: the core counts them but tells no one when they end.
DRAIN_POLL_S = 0.05


class DrainGate(grpc.aio.ServerInterceptor):
    """While `draining`, clients' calls (the `Gateway` service) are refused with UNAVAILABLE, which the SDK
    retries; the workers' registry calls go on (a worker whose heartbeats failed would be dropped, and the
    requests in flight on it with it), and so do health and reflection."""

    def __init__(self, service: str) -> None:
        self.prefix = f"/{service}/"
        self.draining = False

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or not self.draining or not details.method.startswith(self.prefix):
            return handler
        kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k))
        return handler._replace(**{kind: _refuse_draining})


async def _refuse_draining(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)


class GatewayApp:
    """A running gateway: its servers (gRPC, and REST when cfg.http_port is set), core and registry.

    Build it with `start_gateway`.
    """

    def __init__(self, cfg: GatewayConfig, model: ServedModel, server: GrpcServer, core: GatewayCore,
                 http: HttpServer | None = None, gate: DrainGate | None = None) -> None:
        self.cfg = cfg
        self.model = model
        self.server = server
        self.core = core
        self.registry = core.registry
        self.http = http
        self.gate = gate  # None: the gRPC server was built without one, and takes new calls while draining

    @property
    def port(self) -> int:
        """The bound port (the real one when cfg.port was 0)."""
        return self.server.port

    @property
    def address(self) -> str:
        """host:port clients and workers dial."""
        return self.server.address

    @property
    def http_address(self) -> str | None:
        """host:port of the REST facade; None when it is off."""
        return self.http.address if self.http is not None else None

    def busy(self) -> bool:
        """Whether a request is in flight: in the core (gRPC's and REST's), or a REST call on its way to the
        core or back from it (its last events not yet sent)."""
        return bool(self.core.num_in_flight or (self.http is not None and rest_state_of(self.http.app).active))

    async def drain(self, timeout_s: float, hurry: asyncio.Event | None = None) -> None:
        """Stop as SIGTERM asks: refuse new requests at once (REST 503, gRPC UNAVAILABLE, both health
        checks failing), let those in flight run to their end for up to `timeout_s` (or until `hurry` is
        set), then `stop` with what is left of that time as its grace: what still runs then ends as there.

        The listeners stay open meanwhile, so that a load balancer's probes see the 503 and a late
        request gets a clear answer rather than a refused connection.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            if self.gate is not None:
                self.gate.draining = True
            if self.http is not None:
                rest_state_of(self.http.app).draining = True
            await self.server.set_serving(False)
            if self.busy():
                log.info("draining: %d requests in flight get up to %g s to finish; new ones are refused%s",
                         self.core.num_in_flight, timeout_s,
                         " (signal again to stop now)" if hurry is not None else "")
            while self.busy() and loop.time() < deadline and not (hurry is not None and hurry.is_set()):
                await asyncio.sleep(DRAIN_POLL_S)
            if self.busy():
                log.warning("%s with %d requests in flight: ending them",
                            "stopping at once" if hurry is not None and hurry.is_set() else
                            f"drain deadline ({timeout_s:g} s) passed", self.core.num_in_flight)
                deadline = loop.time()
        except BaseException:
            deadline = loop.time()  # cancelled while draining: no more waiting
            raise
        finally:
            await self.stop(max(deadline - loop.time(), 0.0))

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, give in-flight requests `grace_s` to finish, then cancel them and close."""
        stops = [self.server.stop(grace_s)] + ([self.http.stop(grace_s)] if self.http is not None else [])
        await asyncio.gather(*stops)
        await self.core.close()


async def start_gateway(cfg: GatewayConfig) -> GatewayApp:
    """Load the tokenizer, bind, start the sweeper and report SERVING; returns the running gateway.

    With `cfg.api_key` (one key, or several comma-separated), every call to the `Gateway` service
    and every `/v1` REST call needs one of them as a bearer token. `WorkerRegistry` is not behind
    the key: workers are not clients (they hold no key), and with mutual TLS only holders of a
    certificate of the mesh's CA reach it at all; health and reflection stay open for probes.
    The gRPC server speaks mutual TLS when the process has a TLS config (`configure_tls`).
    """
    model = await asyncio.to_thread(load_served_model, cfg)
    # Workers name the model after its folder; the gateway may serve it under another name.
    registry = WorkerRegistry(model.name, cfg.heartbeat_interval_ms, cfg.heartbeat_timeout_ms,
                              model_aliases=[model.path.name])
    pd_health = KvTransferHealth(cfg.kvtransfer) if cfg.kvtransfer else None
    if pd_health is not None:
        await pd_health.start()
    core = GatewayCore(model, registry, router=make_router(cfg.router),
                       default_timeout_s=cfg.default_request_timeout_s,
                       admission=Admission(cfg.admission, lambda: registry.workers(DECODE)), pd_health=pd_health,
                       max_migrations=cfg.max_migrations)
    keys = parse_api_keys(cfg.api_key)
    auth = [ApiKeyInterceptor(ApiKeys(keys), [GATEWAY_SERVICE])] if keys else []
    gate = DrainGate(GATEWAY_SERVICE)  # first: a draining gateway does nothing for a new call
    server = GrpcServer(cfg.host, cfg.port, interceptors=[gate, *auth])
    server.add(gateway_pb2_grpc.add_GatewayServicer_to_server, GatewayServicer(core), GATEWAY_SERVICE)
    server.add(gateway_pb2_grpc.add_WorkerRegistryServicer_to_server, WorkerRegistryServicer(registry),
               REGISTRY_SERVICE)
    await server.start()
    http = None
    if cfg.http_port is not None:
        http = rest_server(core, cfg.host, cfg.http_port, api_key=",".join(keys) or None)
        try:
            await http.start()
        except BaseException:
            await server.stop(0)
            raise
    registry.start()
    # Ready once the tokenizer is loaded: Tokenize and ListModels work without workers, and Generate
    # answers UNAVAILABLE until a decode worker registers (core.has_decode_workers is the hook for
    # stricter readiness).
    await server.set_serving(True)
    return GatewayApp(cfg, model, server, core, http, gate)


async def serve(cfg: GatewayConfig, ready: asyncio.Event | Callable[[GatewayApp], object] | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run the gateway until `stop` is set (default: until SIGINT/SIGTERM), then drain it (`GatewayApp.drain`,
    for up to `cfg.drain_timeout_s`; with the default signal handlers, a second signal ends the drain at once).

    `ready` is set (an Event, as the workers' `serve` takes) or called with the running GatewayApp
    (to learn `app.port`) once the gateway serves.
    """
    own_signals = stop is None
    if stop is None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
    app = await start_gateway(cfg)
    try:
        announce("gateway", app.address)
        if app.http_address is not None:
            announce("gateway", app.http_address, HTTP)
        announce_metrics()
        log.info("serving model %s (context %d tokens) from %s; %s", app.model.name, app.model.max_model_len,
                 app.model.path, app.model.chat.describe())
        if isinstance(ready, asyncio.Event):
            ready.set()
        elif ready is not None:
            ready(app)
        await stop.wait()
    except BaseException:
        await app.stop()
        raise
    hurry = None
    if own_signals:
        hurry = asyncio.Event()
        install_signal_handlers(hurry)  # replaces the first handlers: Ctrl-C twice stops now
    await app.drain(cfg.drain_timeout_s, hurry)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The gateway's options; each can also be set as MOEMESH_<DEST> (e.g. MOEMESH_HEARTBEAT_TIMEOUT_MS)."""
    d = GatewayConfig()
    parser.add_argument("--host", default=d.host, help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=d.port, help="gRPC port, 0 picks one (default: %(default)s)")
    parser.add_argument("--model", default=None,
                        help="model (or tokenizer) folder (default: the embedded tiny model)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model's name for clients and workers (default: the folder's name)")
    parser.add_argument("--heartbeat-interval-ms", type=int, default=d.heartbeat_interval_ms,
                        help="how often workers send heartbeats (default: %(default)s)")
    parser.add_argument("--heartbeat-timeout-ms", type=int, default=d.heartbeat_timeout_ms,
                        help="silence after which a worker is dropped (default: %(default)s)")
    parser.add_argument("--request-timeout-s", type=float, default=d.default_request_timeout_s,
                        help="deadline of a request whose client set none (default: %(default)s)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context limit in tokens (default: the model's)")
    parser.add_argument("--max-migrations", type=int, default=d.max_migrations,
                        help="times one request may continue on other workers after the ones serving it "
                             "failed (default: %(default)s)")
    parser.add_argument("--router", default=d.router, choices=ROUTERS.names(),
                        help="routing policy: prefix_affinity (prefill by prefix-cache affinity, then shortest "
                             "queue; decode by free KV pages), least_load (load only), round_robin (in turn) "
                             "(default: %(default)s)")
    add_chat_arguments(parser)
    parser.add_argument("--kvtransfer", default="127.0.0.1:50060",
                        help="kvtransfer address, watched: while it is unreachable requests run colocated "
                             "('' = not watched)")
    parser.add_argument("--drain-timeout-s", type=float, default=d.drain_timeout_s,
                        help="on SIGTERM, how long requests in flight may run on to their end while new ones are "
                             "refused (REST 503, gRPC UNAVAILABLE, health failing); those still open then end "
                             "with an error, and a second signal ends them at once (default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT,
                        help="port of the OpenAI-compatible REST API, 0 picks one, -1 serves none "
                             "(default: %(default)s)")
    parser.add_argument("--api-key", action=_KeysAction, default=None, metavar="KEY",
                        help="bearer key every Gateway gRPC call and /v1 REST call must send (metadata or header "
                             "'authorization: Bearer KEY'); repeat it or separate keys by commas for several "
                             "(default: none, no key needed); prefer MOEMESH_API_KEY or --api-key-file, which "
                             "other users cannot read from the process list")
    parser.add_argument("--api-key-file", default=None, metavar="FILE",
                        help="file of accepted keys, one per line ('#' comments), added to --api-key's "
                             "(env MOEMESH_API_KEY_FILE)")
    add_tls_arguments(parser)
    add_admission_arguments(parser)
    add_telemetry_arguments(parser, default_metrics_port=9101)
    apply_env_defaults(parser)


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """The chat options (`moemesh up` passes them on to its gateway)."""
    parser.add_argument("--tool-call-parser", default="auto", choices=TOOL_CALL_PARSER_CHOICES,
                        help="how tool calls are read from chat outputs: a format, auto (detected from the "
                             "tokenizer's tool-call tokens and chat template) or none (default: %(default)s)")
    parser.add_argument("--reasoning-parser", default="auto", choices=REASONING_PARSER_CHOICES,
                        help="how the think block is split from chat outputs into reasoning_content: a format, "
                             "auto (on when the chat template writes <think>) or none (default: %(default)s)")
    parser.add_argument("--chat-template", default=None, metavar="FILE",
                        help="a Jinja chat template file replacing the model's, or the name of one moemesh ships "
                             "(deepseek_v3_tools) (default: the model's)")


class _KeysAction(argparse.Action):
    """--api-key, repeatable: the first one on the command line replaces MOEMESH_API_KEY's keys (a flag
    wins over the variable, as for every option), later ones add to it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest, None)
        keys = [] if current is self.default or current is None else list(current)
        setattr(namespace, self.dest, [*keys, str(values)])


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The GatewayConfig of parsed `add_arguments` options (raises ValueError for bad values); several
    keys (--api-key repeated or comma-separated, --api-key-file) travel comma-joined in `api_key`."""
    keys = parse_api_keys(args.api_key, getattr(args, "api_key_file", None))
    if (args.api_key or getattr(args, "api_key_file", None)) and not keys:
        raise ValueError("--api-key / --api-key-file / MOEMESH_API_KEY given, but no key in them")
    return GatewayConfig(
        host=args.host, port=args.port, model_dir=args.model, model_name=args.served_model_name,
        heartbeat_interval_ms=args.heartbeat_interval_ms, heartbeat_timeout_ms=args.heartbeat_timeout_ms,
        default_request_timeout_s=args.request_timeout_s, max_model_len=args.max_model_len,
        http_port=None if args.http_port == -1 else args.http_port, api_key=",".join(keys) or None,
        admission=admission_config(args), kvtransfer=args.kvtransfer or None, max_migrations=args.max_migrations,
        router=args.router, tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
        chat_template=args.chat_template, drain_timeout_s=args.drain_timeout_s)


def run(args: argparse.Namespace) -> int:
    """Serve with parsed options until SIGINT/SIGTERM; bad options or model files exit with 2."""
    try:
        cfg = config_from_args(args)
        configure_tls_from_args(args)  # every gRPC server and channel of the process: mTLS or none
        setup_telemetry("gateway", args)  # logs, tracing, /metrics on --host:--metrics-port
        run_settled(serve, cfg)
    except (ValueError, TokenizerError, OSError, RuntimeError) as exc:  # RuntimeError: a missing OTLP exporter
        print(f"moemesh serve gateway: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m moemesh.services.gateway.serve [options]`."""
    parser = argparse.ArgumentParser(prog="moemesh serve gateway", description="Run the mesh's gateway.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
