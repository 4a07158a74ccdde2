"""Execution slots: the worker's one concurrency bound.

A slot is taken *before* a message is fetched and given back when its task has settled, so a
worker never holds more messages than it can run at once: an idle worker elsewhere gets them.
"""

from __future__ import annotations

import asyncio
from collections import deque

from ..errors import ConfigurationError

__all__ = ["Slots"]


class Slots:
    """A counting semaphore that can also hand out "as many as are free" in one step."""

    __slots__ = ("_free", "_waiters", "total")

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ConfigurationError("a worker needs at least one slot (concurrency >= 1)")
        self.total = total
        self._free = total
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        """Take one slot, waiting for it if none is free."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # it was handed to us just as we were cancelled
            elif waiter in self._waiters:
                # Still queued. (A release() between our cancellation and this line already
                # dropped it, passing its slot on: then there is nothing to undo.)
                self._waiters.remove(waiter)
            raise

    def take_up_to(self, count: int) -> int:
        """Take up to ``count`` more slots without waiting; returns how many were taken."""
        taken = min(count, self._free) if not self._waiters else 0
        self._free -= taken
        return taken

    def release(self, count: int = 1) -> None:
        for _ in range(count):
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    break
            else:
                self._free += 1
