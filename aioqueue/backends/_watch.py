"""Watchers of task states inside one process (the memory and ``rpc://`` backends).

Both learn of every state in this process's own event loop, so a watcher registers and reads
the current state in one step (no await between): nothing can fall between the two.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

__all__ = ["Watchers"]

Current = Callable[[], tuple[bytes | None, bool]]
"""The state now and whether it is final."""


class Watchers:
    """A queue per running ``watch()``, fed by the backend as states arrive."""

    def __init__(self) -> None:
        self._queues: dict[str, list[asyncio.Queue[tuple[bytes, bool]]]] = {}

    def push(self, task_id: str, outcome: bytes, final: bool) -> None:
        for queue in self._queues.get(task_id, ()):
            queue.put_nowait((outcome, final))

    async def follow(self, task_id: str, current: Current) -> AsyncIterator[bytes]:
        """The current state (if any), then each new one, until a final one."""
        queue: asyncio.Queue[tuple[bytes, bool]] = asyncio.Queue()
        queues = self._queues.setdefault(task_id, [])
        queues.append(queue)
        try:
            last, final = current()
            if last is not None:
                yield last
                if final:
                    return
            while True:
                outcome, final = await queue.get()
                if outcome != last:
                    last = outcome
                    yield outcome
                if final:
                    return
        finally:
            queues.remove(queue)
            if not queues and self._queues.get(task_id) is queues:
                del self._queues[task_id]
