"""A page-granular radix prefix cache: requests that share a prompt prefix share its KV pages.

As SGLang's `RadixCache`, but every node below the root holds exactly one FULL page: its key is the
tuple of `page_size` token ids the page covers, its value the page id. A path from the root spells a
token prefix whose length is a multiple of `page_size`; a partially filled page is never cached, since
another request could not append to it without overwriting the owner's tokens.

Ownership (the invariant the engine relies on): every page id is free in the `PagePool`, held by this
tree, or held privately by exactly one request. `insert` moves pages from a request into the tree;
only `evict` and `reset` move them from the tree back to the pool. A request that uses cached pages
`lock`s the deepest node it matched, which pins that node and all its ancestors (ref counts), so
a locked node's ancestors are locked too and eviction (leaves with ref count 0 only) never takes a
page in use.

A typical request, as the scheduler drives it:

    m = cache.match_prefix(prompt)          # reuse m.pages, compute KV only for the rest
    cache.lock(m.node)
    own = pool.alloc(needed)                # private pages for the uncached tail
    ...                                     # prefill; later, when the request finishes:
    full = len(tokens) // page_size
    tree_pages, node = cache.insert(tokens, (m.pages + own)[:full])
    pool.free(p for p, t in zip(m.pages + own, tree_pages) if p != t)   # our duplicates
    pool.free((m.pages + own)[full:])       # the partial last page is never cached
    cache.unlock(m.node)

LRU order uses a logical clock (one tick per match or insert), not wall time, so eviction order is
deterministic and testable.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from moemesh.engine.page_pool import PagePool


class RadixNode:
    """One cached page: `key` (its `page_size` token ids) -> `page`, under the node for the tokens before."""

    __slots__ = ("children", "key", "last_access", "page", "parent", "ref_count")

    def __init__(self, key: tuple[int, ...], page: int, parent: RadixNode | None, last_access: int) -> None:
        self.key = key
        self.page = page
        # None for the root and for nodes that were evicted or reset: a stale handle is detectable.
        self.parent = parent
        self.children: dict[tuple[int, ...], RadixNode] = {}
        self.ref_count = 0
        self.last_access = last_access

    def __repr__(self) -> str:
        # Not a dataclass: its repr would recurse through parent and children.
        return (f"RadixNode(page={self.page}, ref_count={self.ref_count}, last_access={self.last_access}, "
                f"children={len(self.children)})")


@dataclass
class PrefixMatch:
    """The cached part of a token sequence, as `RadixCache.match_prefix` found it."""

    pages: list[int]
    """The cached pages covering the matched prefix, in order."""
    num_tokens: int
    """`len(pages) * page_size`."""
    node: RadixNode
    """The deepest matched node (the root when nothing matched); what to pass to `lock` / `unlock`."""


class RadixCache:
    """Prefix cache over whole KV pages, with ref-count pinning and LRU eviction of unpinned leaves.

    `enabled=False` keeps the same interface but caches nothing: matches are empty and `insert` hands
    every page back to the caller, so the scheduler needs no separate code path.
    """

    def __init__(self, pool: PagePool, page_size: int, enabled: bool = True) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self._pool = pool
        self._page_size = page_size
        self._enabled = enabled
        self._root = RadixNode(key=(), page=-1, parent=None, last_access=0)
        self._clock = 0
        # Pages held by the tree; lets insert refuse a page the tree already owns (a double-own bug).
        self._pages: set[int] = set()
        self._num_evictable = 0
        # Eviction candidates: (last_access, push order, node). Entries are never updated in place;
        # one that no longer describes an unpinned leaf with that timestamp is skipped when popped.
        self._heap: list[tuple[int, int, RadixNode]] = []
        self._push_order = itertools.count()
        self._queried_tokens = 0
        self._hit_tokens = 0

    @property
    def page_size(self) -> int:
        """Tokens per page (and per node)."""
        return self._page_size

    @property
    def enabled(self) -> bool:
        """False when the cache was built disabled and caches nothing."""
        return self._enabled

    @property
    def root(self) -> RadixNode:
        """The root node (holds no page); the tree hangs from its `children`."""
        return self._root

    @property
    def num_cached(self) -> int:
        """Pages held by the tree, locked or not."""
        return len(self._pages)

    @property
    def num_evictable(self) -> int:
        """Pages in nodes with ref count 0: all of them can be evicted, leaves first."""
        return self._num_evictable

    @property
    def hit_rate(self) -> float:
        """Matched / queried tokens over the cache's lifetime (`reset` keeps it); 0.0 before any query."""
        if self._queried_tokens == 0:
            return 0.0
        return self._hit_tokens / self._queried_tokens

    def prefix_tokens(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens of `token_ids` `match_prefix` would match now, without marking or counting
        anything: a scheduler's look before it decides to admit."""
        if not self._enabled:
            return 0
        size, node, n = self._page_size, self._root, 0
        for start in range(0, len(token_ids) - size + 1, size):
            node = node.children.get(tuple(token_ids[start:start + size]))
            if node is None:
                break
            n += size
        return n

    def match_prefix(self, token_ids: Sequence[int]) -> PrefixMatch:
        """The longest prefix of whole pages of `token_ids` present in the tree; marks its path as used.

        A trailing partial page is never matched. Callers that must compute at least one token's logits
        should match `token_ids[:-1]`. The match pins nothing: `lock(match.node)` before relying on it.
        """
        if not self._enabled:
            return PrefixMatch(pages=[], num_tokens=0, node=self._root)
        tick = self._tick()
        size = self._page_size
        node = self._root
        pages: list[int] = []
        for start in range(0, len(token_ids) - size + 1, size):
            child = node.children.get(tuple(token_ids[start:start + size]))
            if child is None:
                break
            self._touch(child, tick)
            pages.append(child.page)
            node = child
        self._queried_tokens += len(token_ids)
        self._hit_tokens += len(pages) * size
        return PrefixMatch(pages=pages, num_tokens=len(pages) * size, node=node)

    def lock(self, node: RadixNode) -> None:
        """Pin `node` and its ancestors (ref count += 1) so eviction leaves their pages alone."""
        for n in self._path(node):
            if n.ref_count == 0:
                self._num_evictable -= 1
            n.ref_count += 1

    def unlock(self, node: RadixNode) -> None:
        """Undo one `lock(node)`; raise `RuntimeError` (changing nothing) if `node` is not locked."""
        path = self._path(node)
        # Ancestors' counts are >= the node's, so the node alone tells whether this unlock is unmatched.
        if path and path[0].ref_count == 0:
            raise RuntimeError(f"unlock of a node that is not locked: {node!r}")
        for n in path:
            n.ref_count -= 1
            if n.ref_count == 0:
                self._num_evictable += 1
                if not n.children:
                    self._push(n)

    def insert(self, token_ids: Sequence[int], pages: Sequence[int]) -> tuple[list[int], RadixNode]:
        """Cache `pages`, page i holding `token_ids[i*page_size:(i+1)*page_size]`; tokens beyond are ignored.

        Where the tree already has a node for a page's tokens it keeps its own page and does not take
        the caller's; new nodes take ownership of the caller's pages. Returns `(tree_pages, last_node)`:
        `tree_pages[i]` is the page the tree now holds for position i. Every `pages[i] != tree_pages[i]`
        is still the caller's to free. `last_node` is the node for the last page (the root if `pages` is
        empty), what to `lock` to keep using `tree_pages`. A disabled cache takes nothing and returns
        `(list(pages), root)`. Raises `ValueError`, changing nothing, if a page to take is free in the
        pool or already held by the tree.
        """
        pages = list(pages)
        size = self._page_size
        if len(token_ids) < len(pages) * size:
            raise ValueError(f"{len(pages)} pages need {len(pages) * size} tokens, got {len(token_ids)}")
        if not self._enabled:
            return pages, self._root
        keys = [tuple(token_ids[i * size:(i + 1) * size]) for i in range(len(pages))]

        # Find the existing part of the path and validate everything before changing anything.
        path: list[RadixNode] = []
        node = self._root
        for key in keys:
            child = node.children.get(key)
            if child is None:
                break
            path.append(child)
            node = child
        for page, existing in zip(pages, path, strict=False):
            if page != existing.page and page in self._pages:
                raise ValueError(f"page {page} is already held by the cache for other tokens")
        new_pages = pages[len(path):]
        self._check_takeable(new_pages)

        tick = self._tick()
        for existing in path:
            existing.last_access = tick
        for key, page in zip(keys[len(path):], new_pages, strict=True):
            child = RadixNode(key=key, page=page, parent=node, last_access=tick)
            node.children[key] = child
            self._pages.add(page)
            self._num_evictable += 1
            node = child
        # Only the deepest node can be a leaf; its heap entry (if any) went stale with the new timestamp.
        if node is not self._root and node.ref_count == 0 and not node.children:
            self._push(node)
        return [n.page for n in path] + new_pages, node

    def evict(self, num_pages: int) -> int:
        """Free up to `num_pages` pages to the pool, least recently used unpinned leaves first.

        A parent becomes a candidate once its last child is gone. Returns how many pages were freed
        (fewer than asked when the rest is pinned or the tree is empty).
        """
        if num_pages < 0:
            raise ValueError(f"cannot evict a negative number of pages ({num_pages})")
        freed: list[int] = []
        while len(freed) < num_pages and self._heap:
            last_access, _, node = heapq.heappop(self._heap)
            if not self._is_candidate(node, last_access):
                continue
            parent = node.parent
            assert parent is not None  # _is_candidate checked it
            del parent.children[node.key]
            node.parent = None
            self._pages.remove(node.page)
            self._num_evictable -= 1
            freed.append(node.page)
            if parent is not self._root and not parent.children and parent.ref_count == 0:
                self._push(parent)
        self._pool.free(freed)
        return len(freed)

    def reset(self) -> None:
        """Empty the tree, freeing every page; raise `RuntimeError` (changing nothing) if any is locked."""
        locked = len(self._pages) - self._num_evictable
        if locked:
            raise RuntimeError(f"cannot reset the prefix cache: {locked} pages are locked by requests")
        pages = []
        for n in self._nodes():
            pages.append(n.page)
            n.parent = None  # stale handles (e.g. a PrefixMatch kept by a caller) now fail loudly
        self._root.children = {}
        self._pages.clear()
        self._num_evictable = 0
        self._heap.clear()
        self._pool.free(pages)

    def reset_stats(self) -> None:
        """Start `hit_rate` over (after a warm-up whose queries no request made)."""
        self._queried_tokens = 0
        self._hit_tokens = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _touch(self, node: RadixNode, tick: int) -> None:
        node.last_access = tick
        # The old heap entry carries the old timestamp and is now stale; an unpinned leaf needs a fresh one.
        if node.ref_count == 0 and not node.children:
            self._push(node)

    def _push(self, node: RadixNode) -> None:
        heapq.heappush(self._heap, (node.last_access, next(self._push_order), node))
        # Repeated touches and lock/unlock cycles leave stale entries; rebuilding once they outnumber the
        # nodes keeps the heap O(nodes) at amortized O(1) per push.
        if len(self._heap) > 2 * len(self._pages) + 64:
            self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        self._heap = [(n.last_access, next(self._push_order), n)
                      for n in self._nodes() if n.ref_count == 0 and not n.children]
        heapq.heapify(self._heap)

    def _is_candidate(self, node: RadixNode, last_access: int) -> bool:
        return (node.parent is not None and not node.children and node.ref_count == 0
                and node.last_access == last_access)

    def _path(self, node: RadixNode) -> list[RadixNode]:
        """`node` and its ancestors, deepest first, root excluded; `ValueError` if not in this tree."""
        path: list[RadixNode] = []
        while node is not self._root:
            if node.parent is None:
                raise ValueError(f"node is not in this cache (evicted, reset or foreign): {node!r}")
            path.append(node)
            node = node.parent
        return path

    def _check_takeable(self, pages: list[int]) -> None:
        if len(set(pages)) != len(pages):
            raise ValueError(f"the same page appears twice in {pages}")
        for page in pages:
            if page in self._pages:
                raise ValueError(f"page {page} is already held by the cache")
            if self._pool.is_free(page):
                raise ValueError(f"page {page} is free in the pool; only allocated pages can be cached")

    def _nodes(self) -> Iterator[RadixNode]:
        """Every node below the root."""
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
