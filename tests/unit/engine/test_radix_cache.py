"""Tests of the KV-page bookkeeping: `PagePool` and the page-granular `RadixCache`."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from moemesh.engine.page_pool import OutOfPages, PagePool
from moemesh.engine.radix_cache import RadixCache, RadixNode

PS = 4  # page size of the example-based tests


def seq(*page_tags: int) -> list[int]:
    """Tokens for whole pages: page i is `PS` copies of `page_tags[i]`, so prefixes are easy to read."""
    return [tag for tag in page_tags for _ in range(PS)]


def walk(cache: RadixCache) -> list[RadixNode]:
    """Every node below the root, found through `children` only (independent of the cache's counters)."""
    nodes, stack = [], list(cache.root.children.values())
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.children.values())
    return nodes


def tree_pages(cache: RadixCache) -> set[int]:
    return {n.page for n in walk(cache)}


def make(num_pages: int = 16, enabled: bool = True) -> tuple[PagePool, RadixCache]:
    pool = PagePool(num_pages)
    return pool, RadixCache(pool, PS, enabled=enabled)


def cache_seq(pool: PagePool, cache: RadixCache, tokens: list[int]) -> tuple[list[int], RadixNode]:
    """Allocate pages for `tokens` (whole pages) and hand them all to the tree, as a finished request would."""
    pages = pool.alloc(len(tokens) // PS)
    tree, node = cache.insert(tokens, pages)
    assert tree == pages, "a fresh sequence must be cached with the caller's own pages"
    return pages, node


# ---------------------------------------------------------------- PagePool


def test_pool_allocates_lowest_ids_first_and_counts() -> None:
    pool = PagePool(5)
    assert (pool.num_pages, pool.num_free) == (5, 5)
    assert pool.alloc(2) == [0, 1]
    assert pool.alloc(0) == []
    assert pool.num_free == 3
    assert not pool.is_free(1) and pool.is_free(2)
    pool.free([1, 0])
    # Freed ids come back lowest first, whatever order they were freed in.
    assert pool.alloc(3) == [0, 1, 2]


def test_pool_alloc_is_all_or_nothing() -> None:
    pool = PagePool(4)
    pool.alloc(2)
    with pytest.raises(OutOfPages, match=r"requested 3.*free 2"):
        pool.alloc(3)
    assert pool.num_free == 2
    assert pool.alloc(2) == [2, 3]
    with pytest.raises(ValueError):
        pool.alloc(-1)


@pytest.mark.parametrize("batch", [[1, 0, 0], [1, 2], [1, 7], [1, -1], [1, True], [1, 1.0]])
def test_pool_free_rejects_a_bad_batch_without_freeing_anything(batch: list) -> None:
    pool = PagePool(4)
    pool.alloc(2)  # pages 0 and 1 are owned; 2 and 3 are free
    with pytest.raises(ValueError):
        pool.free(batch)
    assert pool.num_free == 2 and not pool.is_free(0) and not pool.is_free(1)


def test_pool_free_rejects_already_free_page() -> None:
    pool = PagePool(3)
    pages = pool.alloc(1)
    pool.free(pages)
    with pytest.raises(ValueError, match="double free"):
        pool.free(pages)
    with pytest.raises(ValueError):
        pool.is_free(3)


# ---------------------------------------------------------------- matching and inserting


def test_match_on_empty_tree_is_empty_at_root() -> None:
    _, cache = make()
    m = cache.match_prefix(seq(1, 2))
    assert (m.pages, m.num_tokens, m.node) == ([], 0, cache.root)
    assert cache.num_cached == 0 and cache.num_evictable == 0


def test_insert_then_match_full_and_partial_prefixes() -> None:
    pool, cache = make()
    pages, node = cache_seq(pool, cache, seq(1, 2, 3))
    assert cache.num_cached == 3 and cache.num_evictable == 3
    assert tree_pages(cache) == set(pages)

    full = cache.match_prefix(seq(1, 2, 3))
    assert (full.pages, full.num_tokens, full.node) == (pages, 12, node)
    # Tokens past the cached ones do not stop the match.
    assert cache.match_prefix([*seq(1, 2, 3), 9, 9]).pages == pages
    # A partial last page is never matched, even when its tokens agree.
    assert cache.match_prefix(seq(1, 2, 3)[:11]).pages == pages[:2]
    assert cache.match_prefix(seq(1, 2, 3)[:3]).pages == []
    # Divergence inside the second page keeps only the first.
    diverged = seq(1, 2, 3)
    diverged[6] = 42
    m = cache.match_prefix(diverged)
    assert (m.pages, m.num_tokens) == (pages[:1], 4)
    assert m.node.page == pages[0] and m.node.parent is cache.root


def test_insert_ignores_trailing_tokens_and_needs_enough_tokens() -> None:
    pool, cache = make()
    pages = pool.alloc(2)
    tree, _ = cache.insert([*seq(1, 2), 7, 7, 7], pages)
    assert tree == pages and cache.num_cached == 2
    assert cache.match_prefix(seq(1, 2, 7)).pages == pages  # the trailing 7s were not cached
    with pytest.raises(ValueError):
        cache.insert(seq(5)[:3], pool.alloc(1))


def test_insert_keeps_the_trees_pages_for_duplicates() -> None:
    pool, cache = make()
    first, _ = cache_seq(pool, cache, seq(1, 2))
    # A second request computed the same first page privately, plus a new one.
    mine = pool.alloc(3)
    tree, node = cache.insert(seq(1, 2, 3), mine)
    assert tree == [first[0], first[1], mine[2]]
    assert node.page == mine[2] and cache.num_cached == 3
    assert tree_pages(cache) == {first[0], first[1], mine[2]}
    # The duplicates stay the caller's: still allocated, not in the tree, freeable exactly once.
    dups = [p for p, t in zip(mine, tree, strict=True) if p != t]
    assert dups == mine[:2]
    assert not any(pool.is_free(p) for p in dups)
    pool.free(dups)
    assert pool.num_free == 16 - 3


def test_insert_accepts_the_trees_own_pages_back() -> None:
    pool, cache = make()
    first, _ = cache_seq(pool, cache, seq(1))
    m = cache.match_prefix(seq(1, 2))
    tail = pool.alloc(1)
    tree, node = cache.insert(seq(1, 2), m.pages + tail)
    assert tree == [first[0], tail[0]] and node.parent is m.node


def test_insert_rejects_pages_it_cannot_take_and_changes_nothing() -> None:
    pool, cache = make()
    first, _ = cache_seq(pool, cache, seq(1, 2))
    free_page = 15
    assert pool.is_free(free_page)
    with pytest.raises(ValueError, match="free"):
        cache.insert(seq(3, 4), [pool.alloc(1)[0], free_page])
    with pytest.raises(ValueError, match="already held"):
        cache.insert(seq(5), [first[1]])  # the tree's page for other tokens
    with pytest.raises(ValueError, match="already held"):
        cache.insert(seq(1, 6), [first[1], pool.alloc(1)[0]])
    with pytest.raises(ValueError, match="twice"):
        page = pool.alloc(1)[0]
        cache.insert(seq(7, 8), [page, page])
    assert tree_pages(cache) == set(first) and cache.num_cached == 2 and cache.num_evictable == 2


# ---------------------------------------------------------------- locking and eviction


def test_lock_protects_node_and_ancestors_from_eviction() -> None:
    pool, cache = make()
    pages, _ = cache_seq(pool, cache, seq(1, 2, 3))
    m = cache.match_prefix(seq(1, 2))
    cache.lock(m.node)
    assert [n.ref_count for n in (m.node.parent, m.node)] == [1, 1]
    assert cache.num_evictable == 1
    free_before = pool.num_free
    # Only the unlocked leaf below the locked node can go.
    assert cache.evict(10) == 1
    assert pool.is_free(pages[2]) and pool.num_free == free_before + 1
    assert not pool.is_free(pages[0]) and not pool.is_free(pages[1])
    assert cache.match_prefix(seq(1, 2, 3)).pages == pages[:2]
    assert cache.evict(10) == 0
    cache.unlock(m.node)
    assert cache.num_evictable == 2
    assert cache.evict(10) == 2 and cache.num_cached == 0 and pool.num_free == 16


def test_locked_leaf_is_not_evicted() -> None:
    pool, cache = make()
    (page,), node = cache_seq(pool, cache, seq(1))
    cache.lock(node)
    assert cache.evict(1) == 0 and cache.num_evictable == 0
    assert not pool.is_free(page) and cache.match_prefix(seq(1)).pages == [page]
    cache.unlock(node)
    assert cache.evict(1) == 1 and pool.is_free(page)


def test_eviction_is_least_recently_used_first() -> None:
    pool, cache = make()
    a, _ = cache_seq(pool, cache, seq(1))
    b, _ = cache_seq(pool, cache, seq(2))
    c, _ = cache_seq(pool, cache, seq(3))
    cache.match_prefix(seq(1, 9))  # a is now the most recently used
    order = []
    for _ in range(3):
        before = tree_pages(cache)
        assert cache.evict(1) == 1
        order.extend(before - tree_pages(cache))
    assert order == [b[0], c[0], a[0]]


def test_inserting_a_known_prefix_refreshes_it() -> None:
    pool, cache = make()
    a, _ = cache_seq(pool, cache, seq(1))
    b, _ = cache_seq(pool, cache, seq(2))
    dup = pool.alloc(1)
    cache.insert(seq(1), dup)  # re-inserting a counts as a use
    pool.free(dup)
    cache.evict(1)
    assert tree_pages(cache) == set(a) and pool.is_free(b[0])


def test_evict_frees_children_before_parents() -> None:
    pool, cache = make()
    trunk, _ = cache_seq(pool, cache, seq(1, 2))
    branch = pool.alloc(1)
    cache.insert(seq(1, 2, 3), trunk + branch)
    # Tree: 1 -> 2 -> {3}. Page for 3 is the only leaf; then 2; the root's child goes last.
    assert cache.evict(1) == 1 and pool.is_free(branch[0])
    assert cache.evict(1) == 1 and pool.is_free(trunk[1]) and not pool.is_free(trunk[0])
    assert cache.evict(5) == 1 and pool.is_free(trunk[0])
    assert cache.num_cached == 0 and cache.evict(1) == 0


def test_parent_with_two_children_waits_for_both() -> None:
    pool, cache = make()
    trunk, _ = cache_seq(pool, cache, seq(1))
    left, right = pool.alloc(2)
    cache.insert(seq(1, 2), [trunk[0], left])
    cache.insert(seq(1, 3), [trunk[0], right])
    assert cache.evict(2) == 2
    assert pool.is_free(left) and pool.is_free(right) and not pool.is_free(trunk[0])


def test_num_evictable_and_ref_counts_bookkeeping() -> None:
    pool, cache = make()
    cache_seq(pool, cache, seq(1, 2, 3))
    deep = cache.match_prefix(seq(1, 2, 3)).node
    mid = deep.parent
    cache.lock(mid)
    cache.lock(mid)
    assert cache.num_evictable == 1
    cache.lock(deep)
    assert cache.num_evictable == 0 and (mid.parent.ref_count, mid.ref_count, deep.ref_count) == (3, 3, 1)
    cache.unlock(deep)
    cache.unlock(mid)
    assert cache.num_evictable == 1
    cache.unlock(mid)
    assert cache.num_evictable == 3
    with pytest.raises(RuntimeError):
        cache.unlock(mid)
    assert (mid.parent.ref_count, mid.ref_count, deep.ref_count) == (0, 0, 0)
    assert cache.num_evictable == 3
    cache.evict(1)
    assert cache.num_evictable == 2 == cache.num_cached


def test_root_lock_is_a_no_op_and_stale_nodes_are_rejected() -> None:
    pool, cache = make()
    cache.lock(cache.root)
    cache.unlock(cache.root)
    _, node = cache_seq(pool, cache, seq(1))
    cache.evict(1)
    with pytest.raises(ValueError):
        cache.lock(node)
    other_pool, other = make()
    _, foreign = cache_seq(other_pool, other, seq(1))
    with pytest.raises(ValueError):
        cache.lock(foreign)


def test_lru_survives_many_touches() -> None:
    # Many matches leave many stale heap entries; eviction order must stay exact.
    pool, cache = make()
    a, _ = cache_seq(pool, cache, seq(1))
    b, _ = cache_seq(pool, cache, seq(2))
    for i in range(500):
        node = cache.match_prefix(seq(1 if i % 2 else 2)).node
        cache.lock(node)
        cache.unlock(node)
    cache.match_prefix(seq(2))
    assert cache.evict(1) == 1 and pool.is_free(a[0]) and not pool.is_free(b[0])


def test_reset_frees_everything_unless_locked() -> None:
    pool, cache = make()
    cache_seq(pool, cache, seq(1, 2))
    _, node = cache_seq(pool, cache, seq(3))
    cache.lock(node)
    with pytest.raises(RuntimeError, match="locked"):
        cache.reset()
    assert cache.num_cached == 3 and pool.num_free == 13
    cache.unlock(node)
    cache.reset()
    assert cache.num_cached == 0 and cache.num_evictable == 0 and pool.num_free == 16
    assert cache.match_prefix(seq(1, 2)).pages == []
    with pytest.raises(ValueError):
        cache.lock(node)


# ---------------------------------------------------------------- disabled mode and statistics


def test_disabled_cache_caches_nothing() -> None:
    pool, cache = make(enabled=False)
    pages = pool.alloc(2)
    tree, node = cache.insert(seq(1, 2), pages)
    assert (tree, node) == (pages, cache.root)
    assert not any(pool.is_free(p) for p in pages), "the caller keeps its pages"
    m = cache.match_prefix(seq(1, 2))
    assert (m.pages, m.num_tokens, m.node) == ([], 0, cache.root)
    cache.lock(m.node)
    cache.unlock(m.node)
    assert cache.num_cached == 0 and cache.num_evictable == 0 and cache.evict(5) == 0
    assert cache.hit_rate == 0.0


def test_hit_rate_counts_tokens() -> None:
    pool, cache = make()
    assert cache.hit_rate == 0.0
    cache_seq(pool, cache, seq(1, 2))
    cache.match_prefix([*seq(1, 2), 5, 5, 5, 5])  # 8 of 12 tokens hit
    cache.match_prefix(seq(3))  # 0 of 4
    assert cache.hit_rate == pytest.approx(8 / 16)
    cache.match_prefix(seq(1)[:3])  # 0 of 3: the partial page is no hit
    assert cache.hit_rate == pytest.approx(8 / 19)


# ---------------------------------------------------------------- property: a simulated engine


SIM_PS = 2
SIM_PAGES = 12


@dataclass
class SimRequest:
    tokens: list[int]
    node: RadixNode  # the node this request holds locked (root: none)
    shared: list[int]  # tree pages for the first len(shared) pages of tokens, pinned by `node`
    private: list[int] = field(default_factory=list)  # this request's own pages for the rest


class EngineSim(RuleBasedStateMachine):
    """Drives pool and cache as a scheduler would, and records what each page's KV holds.

    `kv[page]` is the tokens last written into that page. A request writes only into its private pages;
    if the cache ever handed out or evicted a page it should not, the content check catches it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pool = PagePool(SIM_PAGES)
        self.cache = RadixCache(self.pool, SIM_PS)
        self.requests: dict[int, SimRequest] = {}
        self.next_id = 0
        self.kv: dict[int, tuple[int, ...]] = {}

    # -- helpers

    def _alloc(self, n: int) -> list[int] | None:
        if n > self.pool.num_free:
            want = n - self.pool.num_free
            evictable = self.cache.num_evictable
            freed = self.cache.evict(want)
            assert freed == min(want, evictable)
        if n > self.pool.num_free:
            with pytest.raises(OutOfPages):
                self.pool.alloc(n)
            return None
        return self.pool.alloc(n)

    def _write(self, req: SimRequest) -> None:
        """The forward pass: write each private page's tokens into its KV."""
        base = len(req.shared)
        for i, page in enumerate(req.private):
            start = (base + i) * SIM_PS
            self.kv[page] = tuple(req.tokens[start:start + SIM_PS])

    def _pick(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from(sorted(self.requests)))

    def _insert(self, req: SimRequest) -> tuple[list[int], RadixNode]:
        """Cache the request's full pages; free its duplicates; return the tree's pages and node."""
        full = len(req.tokens) // SIM_PS
        mine = req.shared + req.private
        tree, node = self.cache.insert(req.tokens, mine[:full])
        assert len(tree) == full
        assert tree[:len(req.shared)] == req.shared, "pinned pages must stay as they were"
        dups = [p for p, t in zip(mine, tree, strict=False) if p != t]
        assert set(dups) <= set(req.private)
        self.pool.free(dups)
        return tree, node

    # -- rules

    @rule(tokens=st.lists(st.integers(0, 1), max_size=8))
    def start(self, tokens: list[int]) -> None:
        m = self.cache.match_prefix(tokens)
        assert m.num_tokens == len(m.pages) * SIM_PS <= len(tokens)
        self.cache.lock(m.node)
        need = -(-len(tokens) // SIM_PS) - len(m.pages)
        private = self._alloc(need)
        if private is None:
            self.cache.unlock(m.node)
            return
        req = SimRequest(tokens=list(tokens), node=m.node, shared=m.pages, private=private)
        self._write(req)
        self.requests[self.next_id] = req
        self.next_id += 1

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), more=st.lists(st.integers(0, 1), max_size=3))
    def start_sharing(self, data: st.DataObject, more: list[int]) -> None:
        """A request with another running request's prefix (a shared system prompt): makes duplicates."""
        tokens = self.requests[self._pick(data)].tokens
        self.start(tokens[:data.draw(st.integers(0, len(tokens)))] + more)

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), more=st.lists(st.integers(0, 1), min_size=1, max_size=3))
    def extend(self, data: st.DataObject, more: list[int]) -> None:
        req = self.requests[self._pick(data)]
        tokens = req.tokens + more
        need = -(-len(tokens) // SIM_PS) - len(req.shared) - len(req.private)
        pages = self._alloc(need)
        if pages is None:
            return
        req.tokens = tokens
        req.private += pages
        self._write(req)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        req = self.requests.pop(self._pick(data))
        full = len(req.tokens) // SIM_PS
        self._insert(req)
        self.pool.free((req.shared + req.private)[full:])  # the partial last page
        self.cache.unlock(req.node)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def cache_unfinished(self, data: st.DataObject) -> None:
        req = self.requests[self._pick(data)]
        full = len(req.tokens) // SIM_PS
        tree, node = self._insert(req)
        partial = (req.shared + req.private)[full:]
        self.cache.lock(node)
        self.cache.unlock(req.node)
        req.node, req.shared, req.private = node, tree, partial

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        req = self.requests.pop(self._pick(data))
        self.cache.unlock(req.node)
        self.pool.free(req.private)

    @rule(tokens=st.lists(st.integers(0, 1), max_size=8))
    def probe(self, tokens: list[int]) -> None:
        m = self.cache.match_prefix(tokens)
        for i, page in enumerate(m.pages):
            assert self.kv[page] == tuple(tokens[i * SIM_PS:(i + 1) * SIM_PS])
        # Longest match: the next whole page, if any, is not in the tree under m.node.
        nxt = tuple(tokens[m.num_tokens:m.num_tokens + SIM_PS])
        assert len(nxt) < SIM_PS or nxt not in m.node.children

    @rule(n=st.integers(0, SIM_PAGES))
    def evict(self, n: int) -> None:
        evictable, free = self.cache.num_evictable, self.pool.num_free
        freed = self.cache.evict(n)
        assert freed == min(n, evictable)
        assert self.pool.num_free == free + freed

    @rule()
    def reset(self) -> None:
        if any(r.node is not self.cache.root for r in self.requests.values()):
            cached = tree_pages(self.cache)
            with pytest.raises(RuntimeError):
                self.cache.reset()
            assert tree_pages(self.cache) == cached
        else:
            self.cache.reset()
            assert self.cache.num_cached == 0

    # -- invariants

    @invariant()
    def pages_are_owned_exactly_once(self) -> None:
        tree = [n.page for n in walk(self.cache)]
        private = [p for r in self.requests.values() for p in r.private]
        free = [p for p in range(SIM_PAGES) if self.pool.is_free(p)]
        assert len(free) == self.pool.num_free
        assert len(set(tree)) == len(tree) and len(set(private)) == len(private)
        assert not set(tree) & set(free) and not set(tree) & set(private) and not set(private) & set(free)
        assert len(tree) + len(private) + len(free) == SIM_PAGES
        assert self.cache.num_cached == len(tree)
        for r in self.requests.values():
            assert set(r.shared) <= set(tree)

    @invariant()
    def ref_counts_match_the_requests(self) -> None:
        expected: dict[int, int] = {}
        for r in self.requests.values():
            node = r.node
            while node is not self.cache.root:
                expected[id(node)] = expected.get(id(node), 0) + 1
                node = node.parent
        nodes = walk(self.cache)
        for n in nodes:
            assert n.ref_count == expected.get(id(n), 0)
        assert self.cache.num_evictable == sum(1 for n in nodes if n.ref_count == 0)

    @invariant()
    def kv_content_matches_keys(self) -> None:
        for node in walk(self.cache):
            assert self.kv[node.page] == node.key, "a cached page must hold the tokens it is keyed by"
        for r in self.requests.values():
            for i, page in enumerate(r.shared):
                assert self.kv[page] == tuple(r.tokens[i * SIM_PS:(i + 1) * SIM_PS])


EngineSim.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestEngineSim = EngineSim.TestCase
