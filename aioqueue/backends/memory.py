"""In-process result backend for tests and demos, with the same TTL and wake-up behaviour."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

from ..errors import ResultTimeout

__all__ = ["MemoryBackend"]


class MemoryBackend:
    """Outcomes in dicts with expiry times; waiters are futures woken by ``store``."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._final: dict[str, tuple[bytes, float]] = {}
        self._states: dict[str, tuple[bytes, float]] = {}
        self._waiters: defaultdict[str, list[asyncio.Future[bytes]]] = defaultdict(list)

    async def connect(self) -> None:
        return None

    def reply_to(self) -> str | None:
        return None

    def send_token(self) -> object:
        return None

    async def store(
        self, task_id: str, outcome: bytes, *, ttl: float, reply_to: str | None
    ) -> None:
        self._final[task_id] = (outcome, time.monotonic() + ttl)
        self._states.pop(task_id, None)
        for waiter in self._waiters.pop(task_id, ()):
            if not waiter.done():
                waiter.set_result(outcome)

    async def store_state(
        self, task_id: str, outcome: bytes, *, ttl: float, reply_to: str | None = None
    ) -> None:
        self._states[task_id] = (outcome, time.monotonic() + ttl)

    def _live(self, table: dict[str, tuple[bytes, float]], task_id: str) -> bytes | None:
        entry = table.get(task_id)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            del table[task_id]
            return None
        return entry[0]

    async def get(self, task_id: str) -> bytes | None:
        return self._live(self._final, task_id) or self._live(self._states, task_id)

    async def wait(self, task_id: str, *, timeout: float | None, token: object = None) -> bytes:
        found = self._live(self._final, task_id)
        if found is not None:
            return found
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters[task_id].append(waiter)
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise ResultTimeout(f"no result for task {task_id} within {timeout}s") from None
        finally:
            waiters = self._waiters.get(task_id)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[task_id]

    async def forget(self, task_id: str) -> None:
        self._final.pop(task_id, None)
        self._states.pop(task_id, None)

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"MemoryBackend({self.url!r})"
