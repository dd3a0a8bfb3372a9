"""The gateway's routing rules, as pure logic over registry entries (no servers)."""

from __future__ import annotations

import pytest

from moemesh.service.errors import Unavailable
from moemesh.services.gateway.registry import DECODE, PREFILL, WorkerEntry
from moemesh.services.gateway.router import PrefixAffinity, Route, Router
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
    router = Router()
    a, b, c = worker("a", free=50), worker("b", free=80, running=9), worker("c", free=80, running=2)
    assert router.route([a, b, c], [], PROMPT).decode is c
    c.in_flight = 10  # the gateway's own in-flight requests count as running
    assert router.route([a, b, c], [], PROMPT).decode is b


def test_pages_sent_since_the_last_report_count_against_a_worker() -> None:
    a, b = worker("a", free=100), worker("b", free=95)
    a.pending_pages = 10
    assert Router().route([a, b], [], PROMPT).decode is b


def test_draining_unhealthy_and_too_short_workers_are_skipped() -> None:
    router = Router()
    best = worker("best", free=100, draining=True)
    sick = worker("sick", free=90, healthy=False)
    short = worker("short", free=80, max_model_len=100)
    ok = worker("ok", free=10)
    assert router.route([best, sick, short, ok], [], PROMPT).decode is ok
    with pytest.raises(Unavailable, match=r"draining.*unreachable.*context limit 100"):
        router.route([best, sick, short], [], PROMPT)


def test_no_decode_workers() -> None:
    with pytest.raises(Unavailable, match="no decode workers registered"):
        Router().route([], [prefill("p")], PROMPT)


def test_colocated_without_a_prefill_worker_that_can_take_the_request() -> None:
    d = worker("d")
    assert Router().route([d], [], PROMPT).prefill is None
    # All prefill workers gone or draining: the decode worker prefills rather than the request failing.
    assert Router().route([d], [prefill("p", draining=True)], PROMPT) == Route(d, None)


def test_prefill_shortest_queue_counts_waiting_running_and_in_flight() -> None:
    p1, p2, p3 = prefill("p1", waiting=3), prefill("p2", running=1), prefill("p3")
    p3.in_flight = 2
    assert Router().route([worker("d")], [p1, p2, p3], PROMPT).prefill is p2


def test_prefix_affinity_wins_over_queue_length_within_the_imbalance_bound() -> None:
    router = Router(max_affinity_imbalance=4)
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
    router = Router()
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
    router = Router()
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
