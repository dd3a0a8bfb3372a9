"""The gateway's routing policies, as pure logic over registry entries (no servers)."""

from __future__ import annotations

import pytest

from moemesh.service.errors import Unavailable
from moemesh.services.gateway.config import GatewayConfig
from moemesh.services.gateway.registry import DECODE, PREFILL, WorkerEntry
from moemesh.services.gateway.router import (
    LeastLoadRouter,
    PrefixAffinity,
    PrefixAffinityRouter,
    RoundRobinRouter,
    Route,
    Router,
    make_router,
)
from moemesh.services.gateway.routers import ROUTERS
from moemesh.v1 import common_pb2

LAYOUT = common_pb2.KvLayout(model_fingerprint="m", num_layers=4, page_size_tokens=16, kv_lora_rank=512,
                             qk_rope_head_dim=64, dtype=common_pb2.KV_DTYPE_FLOAT32)
OTHER_LAYOUT = common_pb2.KvLayout(model_fingerprint="other", num_layers=4, page_size_tokens=16, kv_lora_rank=512,
                                   qk_rope_head_dim=64, dtype=common_pb2.KV_DTYPE_FLOAT32)
PROMPT = list(range(200))  # three whole 64-token blocks


def worker(worker_id: str, role: int = DECODE, free: int = 100, running: int = 0, waiting: int = 0,
           layout: common_pb2.KvLayout = LAYOUT, **kw: object) -> WorkerEntry:
    load = common_pb2.WorkerLoad(num_free_pages=free, num_total_pages=100, num_running_requests=running,
                                 num_waiting_requests=waiting)
    return WorkerEntry(worker_id=worker_id, role=role, address=f"{worker_id}:1", kv_layout=layout, load=load, **kw)


def prefill(worker_id: str, waiting: int = 0, running: int = 0, layout: common_pb2.KvLayout = LAYOUT,
            **kw: object) -> WorkerEntry:
    return worker(worker_id, PREFILL, waiting=waiting, running=running, layout=layout, **kw)


def test_decode_most_free_pages_then_fewest_running() -> None:
    router = PrefixAffinityRouter()
    a, b, c = worker("a", free=50), worker("b", free=80, running=9), worker("c", free=80, running=2)
    assert router.route([a, b, c], [], PROMPT).decode is c
    c.in_flight = 10  # the gateway's own in-flight requests count as running
    assert router.route([a, b, c], [], PROMPT).decode is b


def test_pages_sent_since_the_last_report_count_against_a_worker() -> None:
    a, b = worker("a", free=100), worker("b", free=95)
    a.pending_pages = 10
    assert PrefixAffinityRouter().route([a, b], [], PROMPT).decode is b


def test_draining_unhealthy_and_too_short_workers_are_skipped() -> None:
    router = PrefixAffinityRouter()
    best = worker("best", free=100, draining=True)
    sick = worker("sick", free=90, healthy=False)
    short = worker("short", free=80, max_model_len=100)
    ok = worker("ok", free=10)
    assert router.route([best, sick, short, ok], [], PROMPT).decode is ok
    with pytest.raises(Unavailable, match=r"draining.*unreachable.*context limit 100"):
        router.route([best, sick, short], [], PROMPT)


def test_no_decode_workers() -> None:
    with pytest.raises(Unavailable, match="no decode workers registered"):
        PrefixAffinityRouter().route([], [prefill("p")], PROMPT)


def test_colocated_without_a_prefill_worker_that_can_take_the_request() -> None:
    d = worker("d")
    assert PrefixAffinityRouter().route([d], [], PROMPT).prefill is None
    # All prefill workers gone or draining: the decode worker prefills rather than the request failing.
    assert PrefixAffinityRouter().route([d], [prefill("p", draining=True)], PROMPT) == Route(d, None)


def test_prefill_shortest_queue_counts_waiting_running_and_in_flight() -> None:
    p1, p2, p3 = prefill("p1", waiting=3), prefill("p2", running=1), prefill("p3")
    p3.in_flight = 2
    assert PrefixAffinityRouter().route([worker("d")], [p1, p2, p3], PROMPT).prefill is p2


def test_prefix_affinity_wins_over_queue_length_within_the_imbalance_bound() -> None:
    router = PrefixAffinityRouter(max_affinity_imbalance=4)
    p1, p2 = prefill("p1"), prefill("p2")
    d = worker("d")
    assert router.route([d], [p1, p2], PROMPT).prefill is p1
    p1.load.num_waiting_requests = 3  # p2 is now shorter, but p1 holds the prefix
    assert router.route([d], [p1, p2], PROMPT + [7, 8]).prefill is p1
    assert router.route([d], [p1, p2], [9] * 200).prefill is p2  # another prefix: shortest queue
    p1.load.num_waiting_requests = 10  # too busy: affinity yields to load
    assert router.route([d], [p1, p2], PROMPT).prefill is p2
    p1.load.num_waiting_requests = 0
    assert router.route([d], [p1, p2], PROMPT).prefill is p2  # the cache moved with the last choice


def test_longest_shared_prefix_decides() -> None:
    router = PrefixAffinityRouter()
    p1, p2 = prefill("p1"), prefill("p2")
    d = worker("d")
    router.affinity.remember(router.affinity.keys(PROMPT[:128]), "p2")
    router.affinity.remember(router.affinity.keys(PROMPT[:64]), "p1")
    assert router.route([d], [p1, p2], PROMPT[:64] + [5] * 64).prefill is p1
    assert router.route([d], [p1, p2], PROMPT).prefill is p2


def test_short_prompts_have_no_affinity() -> None:
    assert PrefixAffinity().keys(list(range(63))) == []
    assert len(PrefixAffinity().keys(list(range(64 * 20)))) == PrefixAffinity().max_blocks


def test_affinity_is_lru_bounded() -> None:
    aff = PrefixAffinity(capacity=4)
    for i in range(10):
        aff.remember([i], f"w{i}")
    assert len(aff) == 4
    assert aff.owners([0]) == [] and aff.owners([9]) == ["w9"]


def test_only_compatible_kv_layouts_are_paired() -> None:
    router = PrefixAffinityRouter()
    d_other = worker("d_other", free=100, layout=OTHER_LAYOUT)
    d_same = worker("d_same", free=10)
    p = prefill("p")
    route = router.route([d_other, d_same], [p], PROMPT)
    assert route.decode is d_same and route.prefill is p
    p_other = prefill("p_other", layout=OTHER_LAYOUT)
    route = router.route([d_other, d_same], [p_other, p], PROMPT)
    assert route.decode is d_other and route.prefill is p_other
    with pytest.raises(Unavailable, match="compatible"):
        router.route([d_same], [p_other], PROMPT)


# -- the policies behind --router ----------------------------------------------------------------------------


def test_every_registered_router_is_built_by_name() -> None:
    kinds = {"prefix_affinity": PrefixAffinityRouter, "least_load": LeastLoadRouter, "round_robin": RoundRobinRouter}
    for name, kind in kinds.items():
        assert type(make_router(name)) is kind
    for name in ROUTERS.names():  # every registered policy is a Router answering to its own name
        router = make_router(name)
        assert isinstance(router, Router) and router.name == name
    with pytest.raises(ValueError, match="unknown router 'random'; choose one of prefix_affinity, least_load"):
        make_router("random")
    assert GatewayConfig().router == "prefix_affinity"
    with pytest.raises(ValueError, match="router must be one of prefix_affinity, least_load, round_robin"):
        GatewayConfig(router="random")


@pytest.mark.parametrize("name", ["prefix_affinity", "least_load", "round_robin"])
def test_every_policy_keeps_the_pairing_rules(name: str) -> None:
    router = make_router(name)
    d_other = worker("d_other", free=100, layout=OTHER_LAYOUT)
    d_same, d_draining = worker("d_same", free=10), worker("d_draining", free=100, draining=True)
    p, p_other = prefill("p"), prefill("p_other", layout=OTHER_LAYOUT)
    p_sick = prefill("p_sick", healthy=False)
    for _ in range(4):  # whatever the turn, a route never pairs incompatible layouts or uses an unroutable worker
        route = router.route([d_other, d_same, d_draining], [p, p_sick], PROMPT)
        assert route.decode is d_same and route.prefill is p
    with pytest.raises(Unavailable, match="compatible"):
        router.route([d_same], [p_other], PROMPT)
    assert router.route([d_same], [prefill("gone", draining=True)], PROMPT) == Route(d_same, None)


def test_least_load_ignores_prefix_affinity() -> None:
    d, p1, p2 = worker("d"), prefill("p1"), prefill("p2")
    affinity, least = PrefixAffinityRouter(), LeastLoadRouter()
    assert affinity.route([d], [p1, p2], PROMPT).prefill is p1
    assert least.route([d], [p1, p2], PROMPT).prefill is p1  # equal queues: the lower id
    p1.load.num_waiting_requests = 3  # p1 served this prefix; p2's queue is shorter
    assert affinity.route([d], [p1, p2], PROMPT).prefill is p1
    assert least.route([d], [p1, p2], PROMPT).prefill is p2
    p2.in_flight = 4  # in-flight requests count: p1 (3) is now the shorter queue
    assert least.route([d], [p1, p2], PROMPT).prefill is p1


def test_least_load_orders_decode_by_free_pages_then_running() -> None:
    a, b, c = worker("a", free=50), worker("b", free=80, running=9), worker("c", free=80, running=2)
    assert LeastLoadRouter().route([a, b, c], [], PROMPT).decode is c


def test_round_robin_takes_workers_in_turn_whatever_their_load() -> None:
    router = RoundRobinRouter()
    a, b, c = worker("a", free=1), worker("b", free=100), worker("c", free=50, running=9)
    p1, p2 = prefill("p1", waiting=50), prefill("p2")
    routes = [router.route([c, a, b], [p2, p1], PROMPT) for _ in range(4)]
    assert [r.decode.worker_id for r in routes] == ["a", "b", "c", "a"]
    assert [r.prefill.worker_id for r in routes] == ["p1", "p2", "p1", "p2"]
    b.draining = True  # a worker out of turn is skipped: the rotation goes over the routable ones
    assert [router.route([a, b, c], [], PROMPT).decode.worker_id for _ in range(2)] == ["a", "c"]


def test_round_robin_rotates_prefill_over_compatible_workers_only() -> None:
    router = RoundRobinRouter()
    d = worker("d")
    p1, p2, p_other = prefill("p1"), prefill("p2"), prefill("p0", layout=OTHER_LAYOUT)
    chosen = [router.route([d], [p_other, p1, p2], PROMPT).prefill.worker_id for _ in range(4)]
    assert chosen == ["p1", "p2", "p1", "p2"]
