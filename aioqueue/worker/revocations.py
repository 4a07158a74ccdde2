"""The task ids a worker will not run, learnt from ``app.control`` pushes and loads.

The handler looks each delivery's id up in :attr:`Revocations.ids` (a dict: one hash lookup,
nothing when no revocation is live); nothing else about revoking touches the hot path.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Revocations"]

_PRUNE_FLOOR = 1024


class Revocations:
    """Revoked ids with their expiry times, and those whose run must be stopped."""

    __slots__ = ("_next_prune", "_on_terminate", "ids", "terminate")

    def __init__(self, on_terminate: Callable[[str], None]) -> None:
        self.ids: dict[str, float] = {}
        self.terminate: set[str] = set()
        self._on_terminate = on_terminate
        self._next_prune = _PRUNE_FLOOR

    def add(self, task_ids: list[str], terminate: bool, expires: float) -> None:
        """Remember them until ``expires``; with ``terminate``, stop their runs now."""
        ids = self.ids
        for task_id in task_ids:
            if ids.get(task_id, 0.0) < expires:
                ids[task_id] = expires
            if terminate and task_id not in self.terminate:
                self.terminate.add(task_id)
                self._on_terminate(task_id)
        if len(ids) >= self._next_prune:
            self.prune()

    def prune(self, now: float | None = None) -> None:
        """Drop expired revocations (amortised: when the dict has doubled since last time)."""
        now = time.time() if now is None else now
        expired = [task_id for task_id, expires in self.ids.items() if expires <= now]
        for task_id in expired:
            del self.ids[task_id]
            self.terminate.discard(task_id)
        self._next_prune = max(_PRUNE_FLOOR, 2 * len(self.ids))
