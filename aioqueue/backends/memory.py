"""In-process result backend for tests and demos, with the same TTL and wake-up behaviour."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

from ..errors import ResultTimeout
from ._expiring import Expiring
from ._watch import Watchers

__all__ = ["MemoryBackend"]


def _set_pending(waiter: asyncio.Future[bytes], outcome: bytes) -> None:
    if not waiter.done():
        waiter.set_result(outcome)


@dataclass(slots=True)
class _Chord:
    members: set[str]
    sent: bool


class MemoryBackend:
    """Outcomes in dicts with expiry times; waiters are futures woken by ``store``."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._final: Expiring[bytes] = Expiring()
        self._states: Expiring[bytes] = Expiring()
        self._waiters: defaultdict[str, list[asyncio.Future[bytes]]] = defaultdict(list)
        self._claims: Expiring[bool] = Expiring()  # the ids claimed, until their claims end
        self._watchers = Watchers()
        self._chords: Expiring[_Chord] = Expiring()  # members in, callback sent

    async def connect(self) -> None:
        return None

    def reply_to(self) -> str | None:
        return None

    def send_token(self) -> object:
        return None

    async def store(
        self,
        task_id: str,
        outcome: bytes,
        *,
        ttl: float,
        reply_to: str | None,
        claim_ttl: float | None = None,
    ) -> None:
        if claim_ttl is not None:
            await self.end_claim(task_id, claim_ttl)
        self._final.put(task_id, outcome, ttl)
        self._states.pop(task_id)
        waiters = self._waiters.pop(task_id, None)
        if waiters:
            here = asyncio.get_running_loop()
            for waiter in waiters:
                if waiter.get_loop() is here:
                    if not waiter.done():
                        waiter.set_result(outcome)
                else:  # a waiter on the sync client's loop thread: wake that loop
                    waiter.get_loop().call_soon_threadsafe(_set_pending, waiter, outcome)
        self._watchers.push(task_id, outcome, True)

    async def chord_join(self, chord_id: str, member_id: str, total: int, ttl: float) -> bool:
        """Count ``member_id`` once; True (once) when all are in: in one process nothing can
        die between this and the callback's publish, so it is marked sent here.

        A chord's state lives ``ttl`` after its latest join, as Redis's join script keeps its
        set (PEXPIRE on every join): a chord whose members never all finish is forgotten, so a
        long-lived process does not keep every chord it ever counted."""
        chord = self._chords.get(chord_id)
        if chord is None:
            chord = _Chord(set(), False)
        self._chords.put(chord_id, chord, ttl)  # kept ttl after its latest join
        chord.members.add(member_id)
        if len(chord.members) >= total and not chord.sent:
            chord.sent = True
            return True
        return False

    async def chord_sent(self, chord_id: str, ttl: float) -> None:
        return None  # marked by chord_join

    async def store_state(
        self, task_id: str, outcome: bytes, *, ttl: float, reply_to: str | None = None
    ) -> None:
        self._states.put(task_id, outcome, ttl)
        self._watchers.push(task_id, outcome, False)

    def watch(self, task_id: str, token: object = None) -> AsyncIterator[bytes]:
        return self._watchers.follow(task_id, partial(self._current, task_id))

    def _current(self, task_id: str) -> tuple[bytes | None, bool]:
        final = self._final.get(task_id)
        return (final, True) if final is not None else (self._states.get(task_id), False)

    async def get(self, task_id: str) -> bytes | None:
        return self._final.get(task_id) or self._states.get(task_id)

    async def wait(self, task_id: str, *, timeout: float | None, token: object = None) -> bytes:
        found = self._final.get(task_id)
        if found is not None:
            return found
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters[task_id].append(waiter)
        try:
            # stored by another loop's thread between the look and the append: look again
            found = self._final.get(task_id)
            if found is not None:
                return found
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
        self._final.pop(task_id)
        self._states.pop(task_id)
        self._claims.pop(task_id)

    async def claim(self, task_id: str, ttl: float, *, fresh: bool) -> bool:
        if self._claims.get(task_id) is not None:
            return False
        if fresh:
            self._final.pop(task_id)
            self._states.pop(task_id)
        elif self._final.get(task_id) is not None:
            return False
        self._claims.put(task_id, True, ttl)
        return True

    async def end_claim(self, task_id: str, claim_ttl: float) -> None:
        if claim_ttl > 0 and self._claims.get(task_id) is not None:
            self._claims.put(task_id, True, claim_ttl)
        else:
            self._claims.pop(task_id)

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"MemoryBackend({self.url!r})"
