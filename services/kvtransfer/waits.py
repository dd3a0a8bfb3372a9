"""Bounded waiting on "something changed", shared by rooms and the relay.

A `Notifier` wakes every current waiter on `notify()`. Waiters check their condition, then wait; in
asyncio nothing runs between the check and the start of the wait, so no wake-up is lost.
"""

from __future__ import annotations

import asyncio
from typing import Any


class Notifier:
    """A broadcast wake-up: `notify()` releases every `wait()` in progress, none that start later."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        """Wake every current waiter."""
        # A fresh event per generation, so a waiter that starts after this call really waits.
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, timeout_s: float) -> bool:
        """Wait for the next `notify()`, at most `timeout_s`; False when the time ran out."""
        event = self._event
        try:
            await asyncio.wait_for(event.wait(), max(timeout_s, 0.0))
        except asyncio.TimeoutError:
            return False
        return True

    async def wait_or(self, future: asyncio.Future[Any], timeout_s: float) -> None:
        """Wait for the next `notify()` or for `future` to finish, at most `timeout_s`.

        `future` is left running when it did not finish: the caller waits on it again or cancels it.
        """
        if future.done():
            return
        waiter = asyncio.ensure_future(self._event.wait())
        try:
            await asyncio.wait((future, waiter), timeout=max(timeout_s, 0.0),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
