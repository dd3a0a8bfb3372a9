"""What a prefill or a decode worker process is made of: an engine on its thread, its KV layout, its
gRPC server shell and its registration with the gateway. The services add their servicer on top."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from moemesh.engine.async_engine import AsyncEngine
from moemesh.engine.engine import Engine
from moemesh.engine.warmup import warm_up
from moemesh.service.channel import CHANNEL_OPTIONS, mesh_channel
from moemesh.service.errors import Unavailable
from moemesh.service.server import GrpcServer, announce, install_signal_handlers
from moemesh.service.tls import add_tls_arguments
from moemesh.service.version import PROTOCOL_VERSION
from moemesh.telemetry import metrics
from moemesh.telemetry.setup import add_telemetry_arguments
from moemesh.transfer.planes import PLANES
from moemesh.v1 import common_pb2, gateway_pb2, kvtransfer_pb2_grpc
from moemesh.worker.engine_args import add_engine_arguments, engine_config
from moemesh.worker.ep_args import add_ep_arguments, ep_config
from moemesh.worker.kv_layout import kv_layout
from moemesh.worker.registration import GatewayRegistrations, parse_gateways

log = logging.getLogger(__name__)

# In-flight requests get this long to finish when a worker is asked to stop.
DRAIN_GRACE_S = 5.0


def add_worker_arguments(p: argparse.ArgumentParser, default_port: int, default_metrics_port: int) -> None:
    """Options every engine worker takes (each also read from MOEMESH_<DEST>); the mutual TLS ones are
    applied by `run_service`."""
    g = p.add_argument_group("worker")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (internal services: loopback)")
    g.add_argument("--port", type=int, default=default_port, help="gRPC port (0 picks a free one)")
    g.add_argument("--advertise-host", default=None,
                   help="host other services use to reach this one (default: --host, or this machine's name)")
    g.add_argument("--gateway", default="127.0.0.1:50051", type=_gateway_spec,
                   help="gateway(s) to register with: HOST:PORT, a comma-separated list, or dns:///NAME:PORT for "
                        "every address the name resolves to ('' = none)")
    g.add_argument("--kvtransfer", default="127.0.0.1:50060", help="kvtransfer service address")
    g.add_argument("--transfer", default="relay", choices=PLANES.names(), help="KV data plane")
    g.add_argument("--worker-id", default=None, help="unique worker id (default: generated)")
    g.add_argument("--instance-id", default=None, help="EP group id (default: the worker id)")
    g.add_argument("--eplb", default="127.0.0.1:50090",
                   help="eplb service: expert load goes there, new placements come from there ('' = none)")
    g.add_argument("--record-expert-load", default=None, metavar="FILE",
                   help="also append this rank's expert load windows to FILE (JSON Lines; `moemesh eplb simulate`)")
    g.add_argument("--expert-load-window-s", type=float, default=1.0, help="seconds of expert load per window")
    g.add_argument("--expert-stats-ep-size", type=int, default=None,
                   help="EP ranks the expert-load balancedness metric spreads the experts over (default: --ep-size)")
    add_engine_arguments(p)
    add_ep_arguments(p)
    add_tls_arguments(p)
    add_telemetry_arguments(p, default_metrics_port)


def _gateway_spec(text: str) -> str:
    """--gateway checked when parsed (argparse type): a bad list or dns:/// name is a usage error."""
    try:
        parse_gateways(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


class WorkerServicer:
    """Base of the prefill and decode servicers: registered before the model loads (so health answers
    NOT_SERVING meanwhile), made ready by `bind`; every RPC before that is UNAVAILABLE."""

    worker: Worker | None = None

    def ready(self) -> Worker:
        if self.worker is None:
            raise Unavailable("this worker is still loading its model")
        return self.worker

    async def bind(self, worker: Worker, kvtransfer: kvtransfer_pb2_grpc.KvTransferStub) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Release what `bind` acquired."""

    # Abort and GetLoad are the same on both kinds of worker (listed first among the bases, these win).
    async def Abort(self, request: common_pb2.AbortRequest, context: grpc.aio.ServicerContext
                    ) -> common_pb2.AbortResponse:
        worker = self.ready()
        return common_pb2.AbortResponse(aborted=await worker.engine.abort(request.request_id))

    async def GetLoad(self, request: common_pb2.GetLoadRequest, context: grpc.aio.ServicerContext
                      ) -> common_pb2.WorkerLoad:
        return self.ready().load_pb()


@dataclass
class Worker:
    """A loaded worker: everything a servicer needs."""

    role: int
    args: argparse.Namespace
    engine: AsyncEngine
    layout: common_pb2.KvLayout
    server: GrpcServer
    worker_id: str
    registration: GatewayRegistrations | None = None

    @classmethod
    async def load(cls, role: int, args: argparse.Namespace, server: GrpcServer) -> Worker:
        cfg = engine_config(args)
        role_name = common_pb2.WorkerRole.Name(role).removeprefix("WORKER_ROLE_").lower()
        ep = None
        epc = ep_config(args)
        if epc is not None:
            from moemesh.ep.group import EPGroup

            ep = await asyncio.to_thread(EPGroup, epc)  # the rendezvous waits for every rank
        mode = "normal" if role == common_pb2.WORKER_ROLE_PREFILL else "low_latency"
        # Loading weights must not block the event loop.
        engine = await asyncio.to_thread(Engine, cfg, None, None, ep, mode)
        if ep is None and not getattr(args, "no_warmup", False):
            await asyncio.to_thread(warm_up, engine)  # before it registers: no request pays the one-time costs
        if ep is not None:
            await asyncio.to_thread(ep.barrier)  # every rank loaded: the first vote will not wait on a load
        dtype = next(engine.model.parameters()).dtype
        layout = kv_layout(engine.model_dir, engine.model.config, dtype, cfg.page_size)
        aengine = AsyncEngine(engine, getattr(args, "engine_nice", 0), getattr(args, "batch_wait_ms", 0.0) / 1e3)
        await aengine.start()
        worker_id = args.worker_id or (args.ep_size > 1 and args.instance_id) or f"{role_name}-{uuid.uuid4().hex[:8]}"
        if args.ep_size > 1:
            worker_id += f"-dp{ep.rank}"
        return cls(role, args, aengine, layout, server, worker_id)

    @property
    def dp(self) -> tuple[int, int]:
        """(rank, size) of this worker among its instance's DP-attention ranks."""
        ep = self.engine.engine.ep
        return (ep.rank, ep.size) if ep is not None else (0, 1)

    def load_pb(self) -> common_pb2.WorkerLoad:
        ld = self.engine.load
        return common_pb2.WorkerLoad(
            num_running_requests=int(ld["num_running"]), num_waiting_requests=int(ld["num_waiting"]),
            num_free_pages=int(ld["num_free_pages"]), num_total_pages=int(ld["num_pages"]),
            prefix_cache_hit_rate=float(ld["prefix_cache_hit_rate"]))

    @property
    def advertised_address(self) -> str:
        return advertised(self.args, self.server.port)

    @property
    def role_name(self) -> str:
        return common_pb2.WorkerRole.Name(self.role).removeprefix("WORKER_ROLE_").lower()

    def publish_metrics(self) -> None:
        """Report the engine's state (queues, KV pages, prefix cache, expert load) at every scrape."""
        role = self.role_name
        metrics.register_load_source(role, self.engine, lambda e: e.load)
        recorder = self.engine.engine.expert_load
        if recorder is not None and recorder.layers:
            ep_size = getattr(self.args, "expert_stats_ep_size", None) or self.dp[1]
            if not 1 <= ep_size <= recorder.num_experts:
                raise ValueError(f"--expert-stats-ep-size must be in [1, {recorder.num_experts}] "
                                 f"(the model's routed experts), got {ep_size}")
            metrics.register_expert_source(role, self.engine, lambda e: e.engine.expert_load.balancedness(ep_size))

    async def register(self) -> None:
        """Join the gateways (in the background: they may start after us)."""
        if not self.args.gateway:
            return
        req = gateway_pb2.RegisterWorkerRequest(
            protocol_version=PROTOCOL_VERSION, worker_id=self.worker_id, role=self.role,
            address=self.advertised_address, instance_id=self.args.instance_id or self.worker_id,
            dp_rank=self.dp[0], dp_size=self.dp[1], model_name=self.engine.engine.model_dir.name, kv_layout=self.layout,
            max_model_len=self.engine.engine.max_model_len)
        self.registration = GatewayRegistrations(self.args.gateway, req, self.load_pb)
        await self.registration.start()

    async def drain(self) -> None:
        """Not serving, leave the gateway; in-flight calls go on until the server stops. Idempotent."""
        await self.server.set_serving(False)
        if self.registration is not None:
            registration, self.registration = self.registration, None
            registration.draining = True
            await registration.stop()

    def start_balancing(self) -> list[asyncio.Task]:
        """Expert load to the eplb service (and the record file); its placements to the EP group."""
        if self.engine.engine.expert_load is None or not self.engine.engine.expert_load.layers:
            return []
        from moemesh.worker.expert_stats import ExpertLoadReporter, GroupIdentity, watch_placements

        a = self.args
        ident = GroupIdentity(a.instance_id or self.worker_id, self.role, self.dp[0], a.nnodes)
        tasks = []
        if a.eplb or a.record_expert_load:
            reporter = ExpertLoadReporter(self.engine, ident, a.eplb, a.record_expert_load, a.expert_load_window_s)
            tasks.append(asyncio.create_task(reporter.run(), name="expert-load"))
        if a.eplb and self.engine.engine.ep is not None:
            tasks.append(asyncio.create_task(watch_placements(self.engine, ident, a.eplb), name="placements"))
        return tasks

    async def watch_engine(self) -> None:
        """If the engine fails (a bug, or a rank of the EP group gone), report NOT_SERVING and leave the
        gateway; the failed requests already got their error."""
        await self.engine.failed.wait()
        log.error("%s: the engine failed (%s); not serving any more", self.worker_id, self.engine.error)
        await self.drain()


def advertised(args: argparse.Namespace, port: int) -> str:
    host = args.advertise_host or args.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"{host}:{port}"


async def run_worker(role: int, name: str, args: argparse.Namespace, servicer: WorkerServicer,
                     add: Callable[[Any, grpc.aio.Server], None], service_name: str,
                     ready: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> None:
    """Bind the port (NOT_SERVING), load the model, serve until `stop` or SIGINT/SIGTERM, then drain.

    The "NAME listening on ADDR" line is printed once the worker is ready: launchers wait for it.
    """
    stop = stop or asyncio.Event()
    install_signal_handlers(stop)
    server = GrpcServer(args.host, args.port)
    server.add(add, servicer, service_name)
    await server.start()
    channel = mesh_channel(args.kvtransfer, options=CHANNEL_OPTIONS)
    worker: Worker | None = None
    try:
        worker = await Worker.load(role, args, server)
        worker.publish_metrics()
        await servicer.bind(worker, kvtransfer_pb2_grpc.KvTransferStub(channel))
        await server.set_serving(True)
        announce(name, worker.advertised_address)
        metrics.announce_metrics()
        await worker.register()
        tasks = [asyncio.create_task(worker.watch_engine(), name="engine-watch"), *worker.start_balancing()]
        if ready is not None:
            ready.set()
        await stop.wait()
        for task in tasks:
            task.cancel()
    finally:
        if worker is not None:
            # Health says NOT_SERVING while in-flight requests finish (the port stays open for probes).
            await worker.drain()
            deadline = asyncio.get_running_loop().time() + DRAIN_GRACE_S
            while worker.engine.engine.scheduler.num_unfinished and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.1)
        await server.stop(grace_s=1.0)
        if worker is not None:
            metrics.unregister_sources(worker.engine)
            await worker.engine.stop()
            await _leave_group(worker)
        await servicer.close()
        await channel.close()


# How long a stopping rank waits for its peers to leave the EP group with it (they stop together, by vote).
LEAVE_GROUP_S = 30.0


async def _leave_group(worker: Worker) -> None:
    """Leave the EP group together with the peers (a barrier, then DeepEP's buffers and the process group are
    destroyed explicitly: their destructors at interpreter exit can hang). Bounded: a peer that never comes
    leaves this rank to exit without it."""
    ep = worker.engine.engine.ep
    if ep is None:
        return
    try:
        await asyncio.wait_for(asyncio.to_thread(ep.close), LEAVE_GROUP_S)
    except (asyncio.TimeoutError, RuntimeError) as e:
        log.warning("left the EP group without its peers: %s", e)
