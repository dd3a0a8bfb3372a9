"""The pool of KV-cache page ids: who may write into which page of the (elsewhere allocated) KV tensors.

Pure bookkeeping over integers `0..num_pages-1`; the tensors live in the model runner. A page is either
free here or owned by someone else (the radix cache or one request); `free` refuses ids that are
already free, so a double free or a stray id fails at the call that caused it, not as corrupted KV later.

Allocation order: lowest free ids first (a min-heap). That keeps runs deterministic whatever the order
pages were freed in, and keeps a lightly loaded worker's pages at the front of the KV tensors.
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Iterable


class OutOfPages(RuntimeError):
    """An allocation asked for more pages than are free; nothing was allocated."""


class PagePool:
    """Free-list of page ids `0..num_pages-1`; `alloc` takes all or nothing, `free` checks every id."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {num_pages}")
        self._num_pages = num_pages
        # A sorted list is already a valid min-heap.
        self._heap: list[int] = list(range(num_pages))
        self._is_free = bytearray(b"\x01") * num_pages

    @property
    def num_pages(self) -> int:
        """Total number of pages, free or not."""
        return self._num_pages

    @property
    def num_free(self) -> int:
        """Pages that `alloc` can hand out right now."""
        return len(self._heap)

    def alloc(self, n: int) -> list[int]:
        """Take `n` free pages, lowest ids first; `OutOfPages` (allocating nothing) if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        if n > len(self._heap):
            raise OutOfPages(f"requested {n} pages, free {len(self._heap)}")
        pages = [heapq.heappop(self._heap) for _ in range(n)]
        for page in pages:
            self._is_free[page] = 0
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Return `pages` to the pool; `ValueError` (freeing nothing) on an unknown or already free id."""
        # Validate the whole batch first so a bad id leaves the pool exactly as it was.
        ids = [self._page_id(page) for page in pages]
        seen: set[int] = set()
        for page in ids:
            if self._is_free[page] or page in seen:
                raise ValueError(f"double free of page {page}")
            seen.add(page)
        for page in ids:
            self._is_free[page] = 1
            heapq.heappush(self._heap, page)

    def is_free(self, page: int) -> bool:
        """True when `page` is in the pool, i.e. nobody owns it; `ValueError` for an id outside the pool."""
        return bool(self._is_free[self._page_id(page)])

    def _page_id(self, page: int) -> int:
        # operator.index admits numpy integers (ids often come out of arrays) but not floats; bool is an
        # int subclass, yet True as a page id is always a caller bug.
        if isinstance(page, bool):
            raise ValueError(f"page id must be an integer, got {page!r}")
        try:
            page_id = operator.index(page)
        except TypeError:
            raise ValueError(f"page id must be an integer, got {page!r}") from None
        if not 0 <= page_id < self._num_pages:
            raise ValueError(f"unknown page id {page_id} (pool has {self._num_pages} pages)")
        return page_id
