"""Who sends a tick: an atomic claim per entry and due time, shared by every scheduler.

Every worker and beat runs the same schedule and tries to claim each due tick; exactly one
claim succeeds. A claim is monotonic per entry: it succeeds only for a due time later than the
entry's last claimed one, so a scheduler that wakes late (or whose clock lags) cannot send a
tick again, and the last claim doubles as the entry's state ("last run", and where
``catch_up`` resumes after an outage).

The tick is claimed before it is sent: a scheduler that dies between the two loses that tick
rather than sending it twice (the next one is on time).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from .._redis import connect_redis, redis_errors_as

if TYPE_CHECKING:
    from .._redis import RedisClient

__all__ = ["MemoryClaims", "RedisClaims", "TickClaims", "TickRecord", "claim_ttl"]

_WEEK = 7 * 86400.0


@dataclass(frozen=True)
class TickRecord:
    """An entry's last claimed tick."""

    due: float
    task_id: str
    sent_at: float


def claim_ttl(period: float) -> float:
    """How long an entry's state outlives its last tick: a week, or three periods if longer.

    An entry removed from the code stops being claimed, so its state expires by itself; an
    outage longer than this makes ``catch_up`` start afresh, like ``skip``.
    """
    return max(_WEEK, 3 * period)


class TickClaims(Protocol):
    description: str
    """Where the claims live, for the log line."""

    async def open(self) -> None: ...

    async def claim(self, entry: str, due: float, task_id: str, ttl: float) -> bool:
        """True for exactly one caller per (entry, due), and only if ``due`` is later than the
        entry's last claim."""

    async def last(self, entries: list[str]) -> dict[str, TickRecord]:
        """The last claimed tick of each entry that has one."""

    async def close(self) -> None: ...


class MemoryClaims:
    """Claims for a ``memory://`` broker: shared by the schedulers of one broker instance."""

    _shared: ClassVar[weakref.WeakKeyDictionary[object, dict[str, TickRecord]]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, owner: object) -> None:
        self._records = self._shared.setdefault(owner, {})
        self.description = "memory"
        # the memory broker's clock (a test's virtual one) stamps when a tick was sent
        self._clock: Callable[[], float] = getattr(owner, "clock", time.time)

    async def open(self) -> None:
        return None

    async def claim(self, entry: str, due: float, task_id: str, ttl: float) -> bool:
        last = self._records.get(entry)
        if last is not None and last.due >= due:
            return False
        self._records[entry] = TickRecord(due, task_id, self._clock())
        return True

    async def last(self, entries: list[str]) -> dict[str, TickRecord]:
        return {name: self._records[name] for name in entries if name in self._records}

    async def close(self) -> None:
        return None


# KEYS[1] the entry's hash; ARGV: due (ms), task id, sent at (ms), ttl (ms).
_CLAIM = """
local last = redis.call('HGET', KEYS[1], 'due')
if last and tonumber(last) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'due', ARGV[1], 'task_id', ARGV[2], 'sent_at', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""


class RedisClaims:
    """Claims as one Lua script per tick on a hash per entry: ``<prefix>:beat:<entry>``."""

    def __init__(self, url: str, *, key_prefix: str, connect_timeout: float, client_name: str):
        self.url = url
        self.key_prefix = key_prefix
        self._connect_timeout = connect_timeout
        self._client_name = client_name
        self._client: RedisClient | None = None
        self._script: Any = None
        self.description = "redis"

    def key(self, entry: str) -> str:
        return f"{self.key_prefix}:beat:{entry}"

    async def open(self) -> None:
        if self._client is None:
            self._client = connect_redis(
                self.url, connect_timeout=self._connect_timeout, client_name=self._client_name
            )
            self._script = self._client.register_script(_CLAIM)

    async def claim(self, entry: str, due: float, task_id: str, ttl: float) -> bool:
        await self.open()
        args = [round(due * 1000), task_id, round(time.time() * 1000), round(ttl * 1000)]
        with redis_errors_as(self.url, what="schedule claims"):
            return bool(await self._script(keys=[self.key(entry)], args=args))

    async def last(self, entries: list[str]) -> dict[str, TickRecord]:
        await self.open()
        assert self._client is not None
        with redis_errors_as(self.url, what="schedule claims"):
            async with self._client.pipeline(transaction=False) as pipe:
                for name in entries:
                    pipe.hgetall(self.key(name))
                replies = await pipe.execute()
        found = {}
        for name, reply in zip(entries, replies, strict=True):
            if reply:
                found[name] = TickRecord(
                    due=int(reply[b"due"]) / 1000,
                    task_id=reply[b"task_id"].decode(),
                    sent_at=int(reply[b"sent_at"]) / 1000,
                )
        return found

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
