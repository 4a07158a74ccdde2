"""A dict whose entries expire, for the in-process backend: nothing outlives its TTL.

Read past its time an entry is gone, and each write first drops every entry whose time is up,
oldest first from a heap, so a long-lived process using ``memory://`` keeps only what is still
live (results nobody reads included), at O(log n) per write and never a scan of the table.
"""

from __future__ import annotations

import heapq
import time
from typing import Generic, TypeVar

__all__ = ["Expiring"]

V = TypeVar("V")


class Expiring(Generic[V]):
    """``key -> value`` entries, each with a monotonic time it expires at."""

    __slots__ = ("_heap", "_items")

    def __init__(self) -> None:
        self._items: dict[str, tuple[V, float]] = {}
        self._heap: list[tuple[float, str]] = []  # (expires, key); stale ones are skipped

    def put(self, key: str, value: V, ttl: float) -> None:
        now = time.monotonic()
        self._sweep(now)
        expires = now + ttl
        self._items[key] = (value, expires)
        heapq.heappush(self._heap, (expires, key))

    def get(self, key: str) -> V | None:
        entry = self._items.get(key)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            del self._items[key]
            return None
        return entry[0]

    def pop(self, key: str) -> None:
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)

    def _sweep(self, now: float) -> None:
        heap, items = self._heap, self._items
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            entry = items.get(key)
            if entry is not None and entry[1] <= now:
                del items[key]
