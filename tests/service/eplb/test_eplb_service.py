"""The eplb service on loopback (`moemesh.services.eplb.serve`): load reports in, placements out to watchers,
the metrics, and the status codes of malformed reports.

Each test starts the real server with `serve()` on a free port and talks to it with a grpc.aio client.
The group: 2 MoE layers x 8 logical experts, EP 2, 10 slots (experts 0 and 1 are replicated at start-up, so
rank 0 holds experts 0-4 and rank 1 experts 5, 6, 7, 0, 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import torch
from prometheus_client import REGISTRY

from moemesh.ep.placement import ExpertPlacement
from moemesh.service.version import PROTOCOL_VERSION
from moemesh.services.eplb.serve import build_parser, serve
from moemesh.telemetry.readiness import GRPC, parse_text
from moemesh.v1 import common_pb2, eplb_pb2, eplb_pb2_grpc

L, E, P, R = 2, 8, 10, 2
DECODE, PREFILL = common_pb2.WORKER_ROLE_DECODE, common_pb2.WORKER_ROLE_PREFILL
START = ExpertPlacement.default(L, E, R, P - E).phy2log
HOT = (2, 3)  # both only on rank 0 at start-up
WAIT_S = 5.0  # deadline for anything the service should do within a period or two (0.5 s)


def counts(hot: tuple[int, ...] = HOT, heavy: int = 400, light: int = 25) -> list[int]:
    """One rank's window, row-major [L, E]."""
    return [heavy if e in hot else light for _ in range(L) for e in range(E)]


def report(rank: int, token_counts: list[int], *, version: int = 0, phy2log: torch.Tensor | None = None,
           instance: str = "decode-0", **fields: object) -> eplb_pb2.ExpertLoadReport:
    now_ms = int(time.time() * 1000)
    msg = {"protocol_version": PROTOCOL_VERSION, "instance_id": instance, "role": DECODE, "ep_rank": rank,
           "num_layers": L, "num_logical_experts": E, "num_physical_experts": P, "ep_size": R,
           "num_expert_groups": 1, "num_nodes": 1, "token_counts": token_counts,
           "window_start_unix_ms": now_ms - 1000, "window_end_unix_ms": now_ms, "placement_version": version,
           "phy2log": [] if phy2log is None else phy2log.reshape(-1).tolist()}
    msg.update(fields)
    return eplb_pb2.ExpertLoadReport(**msg)


def mean_balancedness(load: list[int], phy2log: list[int]) -> float:
    """By hand: per layer mean/max of the per-rank load, an expert's tokens split evenly over its slots."""
    values = []
    for layer in range(L):
        w, slots = load[layer * E:(layer + 1) * E], phy2log[layer * P:(layer + 1) * P]
        ranks = [sum(w[e] / slots.count(e) for e in slots[r * P // R:(r + 1) * P // R]) for r in range(R)]
        values.append(sum(ranks) / R / max(ranks))
    return sum(values) / L


def gauge(name: str, instance: str, role: str = "decode") -> float | None:
    return REGISTRY.get_sample_value(name, {"instance": instance, "role": role})


@contextlib.asynccontextmanager
async def eplb(capsys: pytest.CaptureFixture, *flags: str) -> AsyncIterator[eplb_pb2_grpc.EplbStub]:
    """The real service (period 0.5 s, 100 tokens at least, gain 0.05 at least) and a stub talking to it."""
    args = build_parser().parse_args(["--host", "127.0.0.1", "--port", "0", "--rebalance-period-s", "0.5",
                                      "--rebalance-min-tokens", "100", "--rebalance-min-gain", "0.05",
                                      "--balance-window-s", "60", "--policy", "auto", *flags])
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(args, ready=ready, stop=stop))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED)
    if not ready.is_set():
        waiter.cancel()
        task.cancel()
        raise AssertionError(f"eplb did not start: {task.exception() if task.done() else 'timeout'}")
    listening = [r for r in parse_text(capsys.readouterr().out) if r.kind == GRPC]
    assert [r.service for r in listening] == ["eplb"], "no 'eplb listening on ADDR' line"
    try:
        async with grpc.aio.insecure_channel(listening[0].address) as channel:
            yield eplb_pb2_grpc.EplbStub(channel)
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT_S)


async def send(stub: eplb_pb2_grpc.EplbStub, *reports: eplb_pb2.ExpertLoadReport) -> int:
    """One ReportExpertLoad stream; the number of reports the service says it took."""
    response = await stub.ReportExpertLoad(iter(reports), timeout=WAIT_S)
    return response.num_reports


async def next_placement(call: grpc.aio.UnaryStreamCall, timeout: float = WAIT_S) -> eplb_pb2.Placement:
    msg = await asyncio.wait_for(call.read(), timeout)
    assert msg is not grpc.aio.EOF, f"the watch ended: {await call.code()}"
    return msg


async def get(stub: eplb_pb2_grpc.EplbStub, instance: str = "decode-0", role: int = DECODE) -> eplb_pb2.Placement:
    return await stub.GetPlacement(eplb_pb2.GetPlacementRequest(instance_id=instance, role=role), timeout=WAIT_S)


def check_placement(p: eplb_pb2.Placement) -> ExpertPlacement:
    assert (p.num_layers, p.num_physical_experts, p.ep_size) == (L, P, R)
    return ExpertPlacement(torch.tensor(list(p.phy2log)).view(L, P), R, E)  # raises unless valid


def test_skewed_load_is_rebalanced_and_published_to_watchers(capsys: pytest.CaptureFixture) -> None:
    instance = "decode-0"
    rebalances = gauge("moemesh_eplb_rebalances_total", instance) or 0.0
    moved = gauge("moemesh_eplb_moved_slots_total", instance) or 0.0

    async def main() -> None:
        async with eplb(capsys) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await get(stub, instance)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND and instance in e.value.details()

            watch = stub.WatchPlacement(eplb_pb2.GetPlacementRequest(instance_id=instance, role=DECODE))
            skew = counts()
            assert await send(stub, report(0, skew, phy2log=START), report(1, skew)) == 2
            load = [2 * c for c in skew]
            before = mean_balancedness(load, START.reshape(-1).tolist())
            assert before == pytest.approx(950 / 1700)  # rank 0: 25 + 25 + 800 + 800 + 50, rank 1: 200
            assert gauge("moemesh_eplb_mean_balancedness", instance) == pytest.approx(before)

            first = await next_placement(watch)
            assert first.version == 1
            placement = check_placement(first)
            assert first.previous_balancedness == pytest.approx(before)
            assert first.expected_balancedness == pytest.approx(mean_balancedness(load, list(first.phy2log)))
            assert first.expected_balancedness >= first.previous_balancedness + 0.05
            assert first.num_moved_slots == int((placement.phy2log != START).sum()) > 0
            assert await get(stub, instance) == first
            assert gauge("moemesh_eplb_placement_version", instance) == 1
            assert gauge("moemesh_eplb_rebalances_total", instance) == rebalances + 1
            assert gauge("moemesh_eplb_moved_slots_total", instance) == moved + first.num_moved_slots

            # A watcher that connects now gets the current placement at once.
            late = stub.WatchPlacement(eplb_pb2.GetPlacementRequest(instance_id=instance, role=DECODE))
            assert await next_placement(late, timeout=1.0) == first

            # The ranks switch, and the load shifts onto two experts that only rank 0 holds under placement 1.
            rows = placement.phy2log.tolist()
            singles = [e for e in range(E) if all(r.count(e) == 1 and r.index(e) < P // R for r in rows)][:2]
            assert len(singles) == 2
            shifted = counts(hot=tuple(singles))
            assert await send(stub, report(0, shifted, version=1, phy2log=placement.phy2log),
                              report(1, shifted, version=1)) == 2
            after = mean_balancedness([2 * c for c in shifted], list(first.phy2log))
            assert gauge("moemesh_eplb_mean_balancedness", instance) == pytest.approx(after)

            second, second_late = await next_placement(watch), await next_placement(late)
            assert second == second_late and second.version == 2
            check_placement(second)
            assert second.previous_balancedness == pytest.approx(after)
            assert second.expected_balancedness >= after + 0.05
            assert await get(stub, instance) == second
            assert gauge("moemesh_eplb_placement_version", instance) == 2
            watch.cancel()
            late.cancel()

    asyncio.run(main())


def test_placement_before_any_decision(capsys: pytest.CaptureFixture) -> None:
    async def main() -> None:
        async with eplb(capsys, "--rebalance-period-s", "60") as stub:
            own = torch.tensor([[2, 3, 0, 1, 4, 5, 6, 7, 0, 1]] * L)
            assert await send(stub, report(0, counts(), phy2log=own, instance="decode-a")) == 1
            assert await send(stub, report(1, counts(), instance="decode-b")) == 1
            # What the rank runs; and, from a rank that did not send it, the start-up placement.
            a, b = await get(stub, "decode-a"), await get(stub, "decode-b")
            assert (a.version, list(a.phy2log)) == (0, own.reshape(-1).tolist())
            assert (b.version, list(b.phy2log)) == (0, START.reshape(-1).tolist())
            assert (a.previous_balancedness, a.expected_balancedness, a.num_moved_slots) == (0.0, 0.0, 0)
            assert gauge("moemesh_eplb_placement_version", "decode-a") == 0
            assert gauge("moemesh_eplb_mean_balancedness", "decode-a") == pytest.approx(
                mean_balancedness(counts(), own.reshape(-1).tolist()))
            for layer in range(L):
                assert REGISTRY.get_sample_value("moemesh_eplb_balancedness", {
                    "instance": "decode-b", "role": "decode", "layer": str(layer)}) == pytest.approx(950 / 1700)
            # Prefill and decode groups of one instance are apart.
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await get(stub, "decode-a", PREFILL)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            # Before a decision a watcher gets nothing: version 0 is what the ranks started with.
            watch = stub.WatchPlacement(eplb_pb2.GetPlacementRequest(instance_id="decode-a", role=DECODE))
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(watch.read(), 0.3)
            watch.cancel()

    asyncio.run(main())


MALFORMED = [
    pytest.param({"token_counts": counts()[:-1]}, grpc.StatusCode.INVALID_ARGUMENT, "token_counts", id="token_counts"),
    pytest.param({"phy2log": START.reshape(-1).tolist()[:-1]}, grpc.StatusCode.INVALID_ARGUMENT, "phy2log",
                 id="phy2log-length"),
    pytest.param({"phy2log": [*START.reshape(-1).tolist()[:-1], E]}, grpc.StatusCode.INVALID_ARGUMENT, "phy2log",
                 id="phy2log-expert-id"),
    pytest.param({"num_physical_experts": E - 2, "ep_size": 2}, grpc.StatusCode.INVALID_ARGUMENT,
                 "num_physical_experts", id="fewer-slots-than-experts"),
    pytest.param({"num_physical_experts": 9}, grpc.StatusCode.INVALID_ARGUMENT, "ep_size", id="slots-over-ranks"),
    pytest.param({"ep_rank": R}, grpc.StatusCode.INVALID_ARGUMENT, "ep_rank", id="ep_rank"),
    pytest.param({"instance_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "instance_id", id="instance_id"),
    pytest.param({"role": common_pb2.WORKER_ROLE_UNSPECIFIED}, grpc.StatusCode.INVALID_ARGUMENT, "role", id="role"),
    pytest.param({"role": 7}, grpc.StatusCode.INVALID_ARGUMENT, "role", id="role-unknown"),
    pytest.param({"num_layers": 0, "token_counts": []}, grpc.StatusCode.INVALID_ARGUMENT, "num_layers",
                 id="num_layers"),
    pytest.param({"num_expert_groups": 3}, grpc.StatusCode.INVALID_ARGUMENT, "num_expert_groups",
                 id="num_expert_groups"),
    pytest.param({"protocol_version": common_pb2.PROTOCOL_VERSION_UNSPECIFIED},
                 grpc.StatusCode.FAILED_PRECONDITION, "protocol", id="protocol_version"),
    pytest.param({"protocol_version": 99}, grpc.StatusCode.FAILED_PRECONDITION, "protocol",
                 id="protocol_version-unknown"),
]


@pytest.mark.parametrize(("fields", "code", "names"), MALFORMED)
def test_a_malformed_report_ends_the_stream(capsys: pytest.CaptureFixture, fields: dict, code: grpc.StatusCode,
                                            names: str) -> None:
    async def main() -> None:
        async with eplb(capsys) as stub:
            bad = report(0, counts(), phy2log=START, instance="decode-bad")
            for name, value in fields.items():
                if isinstance(value, list):
                    getattr(bad, name)[:] = value
                else:
                    setattr(bad, name, value)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await send(stub, bad)
            assert e.value.code() == code, e.value.details()
            assert names in e.value.details()
            # Nothing of it was recorded.
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await get(stub, "decode-bad")
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            # The service is fine: a good report on a new stream is taken.
            assert await send(stub, report(0, counts(), phy2log=START, instance="decode-good")) == 1

    asyncio.run(main())


def test_a_placement_that_drops_an_expert_is_refused(capsys: pytest.CaptureFixture) -> None:
    async def main() -> None:
        async with eplb(capsys) as stub:
            no_seven = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2]] * L)  # expert 7 nowhere
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await send(stub, report(0, counts(), phy2log=no_seven, instance="decode-bad"))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "phy2log" in e.value.details()

    asyncio.run(main())


def test_a_bad_report_after_good_ones_keeps_the_good_ones(capsys: pytest.CaptureFixture) -> None:
    async def main() -> None:
        async with eplb(capsys, "--rebalance-period-s", "60") as stub:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await send(stub, report(0, counts(), phy2log=START, instance="decode-c"),
                           report(1, counts(), instance="decode-c", ep_rank=5))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ep_rank" in e.value.details()
            assert (await get(stub, "decode-c")).version == 0
            assert gauge("moemesh_eplb_mean_balancedness", "decode-c") == pytest.approx(950 / 1700)

    asyncio.run(main())
