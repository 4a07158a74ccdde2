"""The outcomes a sending process has been pushed, kept for a wait that starts after the push.

Bounded by bytes, not by count: ten thousand 1 MB outcomes must not pin 10 GB. Each entry lives
for its result TTL, like the stored copy it mirrors, and ``forget()`` drops it, so a process's
``get()`` and ``state()`` agree with the backend (both PENDING once the result is gone).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict

__all__ = ["DEFAULT_MAX_BYTES", "PushCache"]

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
# What a dict slot, the tuple, the float and the key object cost besides the payload bytes.
_ENTRY_OVERHEAD = 200
_DROPPED_IDS = 10_000


class PushCache:
    """Outcomes by task id: oldest out first past ``max_bytes``, each gone after its TTL.

    ``evictions`` counts entries dropped before their TTL (to make room, or too big to keep):
    a waiter whose send predates a change of it may have lost its push and must read the store.
    ``was_dropped`` names the recent ones, for backends with no store to read (``rpc://``).
    An entry put with ``ttl_known=False`` (its TTL was guessed) serves waits, but ``get(...,
    known_ttl_only=True)`` skips it, so a state read goes to the store, which knows the TTL.
    """

    __slots__ = ("_bytes", "_dropped", "_entries", "evictions", "max_bytes")

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.evictions = 0
        self._bytes = 0
        self._entries: OrderedDict[str, tuple[bytes, float, bool]] = OrderedDict()
        self._dropped: OrderedDict[str, None] = OrderedDict()

    @property
    def nbytes(self) -> int:
        """Bytes accounted to the entries held now (payload, key and per-entry overhead)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _size(task_id: str, outcome: bytes) -> int:
        return len(outcome) + len(task_id) + _ENTRY_OVERHEAD

    def put(self, task_id: str, outcome: bytes, ttl: float, *, ttl_known: bool = True) -> None:
        """Keep ``outcome`` for ``ttl`` seconds, unless it alone exceeds the bound."""
        self.pop(task_id)
        self._expire_oldest()
        size = self._size(task_id, outcome)
        if not ttl > 0:  # also NaN: an outcome already expired is not kept
            return
        if size > self.max_bytes:
            self._drop(task_id)
            return
        expires = time.monotonic() + ttl if math.isfinite(ttl) else math.inf
        self._entries[task_id] = (outcome, expires, ttl_known)
        self._bytes += size
        while self._bytes > self.max_bytes:
            old_id, (old, _, _) = self._entries.popitem(last=False)
            self._bytes -= self._size(old_id, old)
            self._drop(old_id)

    def get(self, task_id: str, *, known_ttl_only: bool = False) -> bytes | None:
        entry = self._entries.get(task_id)
        if entry is None or (known_ttl_only and not entry[2]):
            return None
        if entry[1] <= time.monotonic():
            self.pop(task_id)
            return None
        return entry[0]

    def pop(self, task_id: str) -> None:
        """Forget ``task_id`` here (its entry, and that it was ever dropped)."""
        entry = self._entries.pop(task_id, None)
        if entry is not None:
            self._bytes -= self._size(task_id, entry[0])
        self._dropped.pop(task_id, None)

    def was_dropped(self, task_id: str) -> bool:
        """True when an outcome for ``task_id`` arrived recently but could not be kept."""
        return task_id in self._dropped

    def _drop(self, task_id: str) -> None:
        self.evictions += 1
        self._dropped[task_id] = None
        if len(self._dropped) > _DROPPED_IDS:
            self._dropped.popitem(last=False)

    def _expire_oldest(self) -> None:
        """Drop expired entries at the old end (most TTLs are equal, so most expire in order)."""
        now = time.monotonic()
        while self._entries:
            task_id, (outcome, expires, _) = next(iter(self._entries.items()))
            if expires > now:
                return
            del self._entries[task_id]
            self._bytes -= self._size(task_id, outcome)
