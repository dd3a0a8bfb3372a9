"""Choosing the decode and prefill worker of a request: pure logic over registry entries, one policy per
`--router` choice (registered by name in `routers.py`).

Every policy routes only to routable workers whose context fits the prompt, and pairs a prefill worker with
a decode worker only when their KV layouts match exactly (model fingerprint, page size, dtype, widths), since
KV pages are copied as raw rows; with no usable prefill worker the route is colocated. They differ in order:
- prefix_affinity (the default): decode by most free KV pages (reported, less what was sent since), then the
  fewest running plus in-flight requests; prefill by the longest matching prompt prefix served before (its
  radix cache likely still holds it) unless its queue is much longer than the shortest, else the shortest queue.
- least_load: decode as above; prefill by the shortest queue alone.
- round_robin: each request takes the next worker in turn (by worker id), decode and prefill alike.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from moemesh.service.errors import Unavailable
from moemesh.services.gateway.registry import WorkerEntry
from moemesh.services.gateway.routers import ROUTERS
from moemesh.transfer.layout import KvLayout
from moemesh.v1 import common_pb2

log = logging.getLogger(__name__)

# Prefix blocks of this many tokens are hashed for affinity (a multiple of every usual page size).
AFFINITY_BLOCK_TOKENS = 64
# Hashing further in costs time on every request and rarely changes the choice.
AFFINITY_MAX_BLOCKS = 8
AFFINITY_CAPACITY = 16384
# Affinity yields to load once the remembered worker's queue is this much longer than the shortest.
AFFINITY_MAX_IMBALANCE = 8


@dataclass(frozen=True)
class Route:
    """Where one request goes; `prefill` None means colocated (the decode worker prefills itself)."""

    decode: WorkerEntry
    prefill: WorkerEntry | None


def kv_compatible(a: common_pb2.KvLayout, b: common_pb2.KvLayout) -> bool:
    """True when KV pages of layout `a` (as registered) can be copied into pages of layout `b` as they are."""
    return KvLayout.from_proto(a).compatible(KvLayout.from_proto(b))


def fits(worker: WorkerEntry, prompt_len: int) -> bool:
    """True when the worker's context limit (0: not reported) leaves room for one generated token."""
    return worker.max_model_len == 0 or prompt_len < worker.max_model_len


class PrefixAffinity:
    """An LRU map from hashes of a prompt's first whole blocks to the prefill worker that served it."""

    def __init__(self, block_tokens: int = AFFINITY_BLOCK_TOKENS, max_blocks: int = AFFINITY_MAX_BLOCKS,
                 capacity: int = AFFINITY_CAPACITY) -> None:
        self.block_tokens = block_tokens
        self.max_blocks = max_blocks
        self.capacity = capacity
        self._owner: OrderedDict[int, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    def keys(self, token_ids: Sequence[int]) -> list[int]:
        """One key per whole leading block (up to max_blocks), each hashing every token before it."""
        keys: list[int] = []
        h = 0
        n = min(len(token_ids) // self.block_tokens, self.max_blocks)
        for i in range(n):
            h = hash((h, tuple(token_ids[i * self.block_tokens:(i + 1) * self.block_tokens])))
            keys.append(h)
        return keys

    def owners(self, keys: Sequence[int]) -> list[str]:
        """Worker ids remembered for `keys`, longest prefix first."""
        found = []
        for key in reversed(keys):
            owner = self._owner.get(key)
            if owner is not None:
                self._owner.move_to_end(key)
                found.append(owner)
        return found

    def remember(self, keys: Sequence[int], worker_id: str) -> None:
        """`worker_id` now holds the prefixes `keys` in its cache."""
        for key in keys:
            self._owner[key] = worker_id
            self._owner.move_to_end(key)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)


def decode_order(worker: WorkerEntry) -> tuple[int, int, int, str]:
    """Sort key, best first: most free pages, fewest running + in flight, fewest waiting, then id."""
    return (-worker.free_pages, worker.load.num_running_requests + worker.in_flight,
            worker.load.num_waiting_requests, worker.worker_id)


class Router(ABC):
    """Picks a Route for each request: the rules every policy keeps; subclasses choose the order."""

    name: str  # its --router choice

    def route(self, decode_workers: Sequence[WorkerEntry], prefill_workers: Sequence[WorkerEntry],
              prompt: Sequence[int]) -> Route:
        """The route of a request with token ids `prompt`; raises Unavailable saying why there is none.

        With no prefill worker registered, or none that can take the request now (all dead, draining or
        unable to fit it), the route is colocated: the decode worker prefills, as it does alone.
        """
        if not decode_workers:
            raise Unavailable("no decode workers registered")
        decodes = self.order_decodes([d for d in decode_workers if d.routable and fits(d, len(prompt))])
        if not decodes:
            raise Unavailable(f"no decode worker can take a request now: {_why_not(decode_workers, len(prompt))}")
        if not prefill_workers:
            return Route(decodes[0], None)
        prefills = [p for p in prefill_workers if p.routable and fits(p, len(prompt))]
        if not prefills:
            log.info("no prefill worker can take a request now (%s): colocated on %s",
                     _why_not(prefill_workers, len(prompt)), decodes[0].name)
            return Route(decodes[0], None)
        for decode in decodes:
            compatible = [p for p in prefills if kv_compatible(p.kv_layout, decode.kv_layout)]
            if compatible:
                return Route(decode, self.choose_prefill(compatible, prompt))
        raise Unavailable(
            "no prefill worker has a KV layout compatible with any decode worker (model fingerprint, "
            f"page size, dtype and widths must match): decode {_layouts(decodes)}; prefill {_layouts(prefills)}")

    def order_decodes(self, candidates: list[WorkerEntry]) -> list[WorkerEntry]:
        """The routable decode workers that fit, best first (the first one with a compatible prefill wins)."""
        return sorted(candidates, key=decode_order)

    @abstractmethod
    def choose_prefill(self, candidates: Sequence[WorkerEntry], prompt: Sequence[int]) -> WorkerEntry:
        """One of `candidates` (routable, fitting, layout-compatible with the chosen decode; never empty)."""


def shortest_queue(candidates: Sequence[WorkerEntry]) -> WorkerEntry:
    """The worker with the fewest waiting + running + in-flight requests, then the lowest id."""
    return min(candidates, key=lambda p: (p.queue_len, p.worker_id))


class PrefixAffinityRouter(Router):
    """Prefix-cache affinity for prefill (within an imbalance bound), load for decode; remembers its choices."""

    name = "prefix_affinity"

    def __init__(self, affinity: PrefixAffinity | None = None,
                 max_affinity_imbalance: int = AFFINITY_MAX_IMBALANCE) -> None:
        self.affinity = affinity if affinity is not None else PrefixAffinity()
        self.max_affinity_imbalance = max_affinity_imbalance

    def choose_prefill(self, candidates: Sequence[WorkerEntry], prompt: Sequence[int]) -> WorkerEntry:
        """Prefix affinity within the imbalance bound, else the shortest queue; remembers the choice."""
        keys = self.affinity.keys(prompt)
        shortest = shortest_queue(candidates)
        chosen = shortest
        by_id = {p.worker_id: p for p in candidates}
        for owner in self.affinity.owners(keys):
            worker = by_id.get(owner)
            if worker is not None and worker.queue_len - shortest.queue_len <= self.max_affinity_imbalance:
                chosen = worker
                break
        self.affinity.remember(keys, chosen.worker_id)
        return chosen


class LeastLoadRouter(Router):
    """Load alone: decode by free KV pages then running requests, prefill by the shortest queue."""

    name = "least_load"

    def choose_prefill(self, candidates: Sequence[WorkerEntry], prompt: Sequence[int]) -> WorkerEntry:
        return shortest_queue(candidates)


class RoundRobinRouter(Router):
    """Each request the next routable, compatible worker in worker-id order, decode and prefill each in turn."""

    name = "round_robin"

    def __init__(self) -> None:
        # Requests routed so far, per role: the turn survives workers joining and leaving.
        self._decode_turn = 0
        self._prefill_turn = 0

    def order_decodes(self, candidates: list[WorkerEntry]) -> list[WorkerEntry]:
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        if not ordered:
            return ordered
        start = self._decode_turn % len(ordered)
        self._decode_turn += 1
        return ordered[start:] + ordered[:start]

    def choose_prefill(self, candidates: Sequence[WorkerEntry], prompt: Sequence[int]) -> WorkerEntry:
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        chosen = ordered[self._prefill_turn % len(ordered)]
        self._prefill_turn += 1
        return chosen


def make_router(name: str) -> Router:
    """A fresh router of the policy `name` (see `routers.py`); ValueError listing the choices for another."""
    return ROUTERS.load(name)()


def _why_not(workers: Sequence[WorkerEntry], prompt_len: int) -> str:
    reasons = []
    for w in workers:
        if w.draining:
            why = "draining"
        elif not w.healthy:
            why = "unreachable, waiting for its next heartbeat"
        elif not fits(w, prompt_len):
            why = f"context limit {w.max_model_len} <= prompt length {prompt_len}"
        else:
            why = "removed"
        reasons.append(f"{w.worker_id} at {w.address} ({why})")
    return ", ".join(reasons)


def _layouts(workers: Sequence[WorkerEntry]) -> str:
    def short(layout: common_pb2.KvLayout) -> str:
        return (f"fingerprint={layout.model_fingerprint or '-'} page={layout.page_size_tokens} "
                f"dtype={_dtype_name(layout.dtype)}")

    return ", ".join(f"{w.worker_id}[{short(w.kv_layout)}]" for w in workers)


def _dtype_name(dtype: int) -> str:
    return common_pb2.KvDtype.Name(dtype) if dtype in common_pb2.KvDtype.values() else str(dtype)
