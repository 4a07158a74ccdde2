"""Where rate limits and concurrency caps are counted: one Redis for every worker, or memory.

On Redis (the result backend's, else the broker's), under prefix ``p``::

    p:limit:rate:{<task>}:<i>:<b>       string  GCRA's theoretical arrival time (server clock,
                                                us) for an interval of <i> us and a burst of <b>
    p:limit:rate:{<task>}:<i>:<b>:back  string  when the next deferred start is to come back (us)
    p:limit:held:{<task>}        sorted set  holders of a concurrency permit, by lease expiry (ms)

Each check is one script, run on the server's clock (``TIME``) so workers with skewed clocks
agree:

* **rate** (GCRA with reservation): a start within ``horizon`` seconds from now is *reserved*
  (the arrival time moves on by one interval) and the worker waits for it without a slot; one
  further out is refused, and nothing is reserved: it is told when to come back (half a
  horizon before its start would be allowed, and at least an interval after the one refused
  before it, from a second counter), so deferred tasks come back in the order they were
  refused, at the rate, whichever worker refused them, and mostly reserve on their first
  return. Reserving hands the starts out in the order the checks arrive.
* **concurrency**: expired leases are dropped, then a permit is taken if fewer than the cap are
  held. A worker renews the leases of its running tasks (every third of the lease); a worker
  that dies stops renewing, so its permits come back within one lease.

Memory: the same arithmetic in the process (a MemoryBroker's workers share one; with an AMQP
broker and ``rpc://`` results there is no shared store, and each worker counts alone).
"""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ._redis import Script

if TYPE_CHECKING:
    from ._redis import CommandBatcher
    from .app import App
    from .limits import Rate

__all__ = ["Limiter", "MemoryLimiter", "RedisLimiter", "limiter_for"]

_OFFSET_WINDOW = 10.0
"""Seconds of samples in each of the two windows the clock offset is the minimum of."""


class Limiter(Protocol):
    shared: bool
    """True when every worker counts against the same store."""

    async def reserve(self, task: str, rate: Rate, horizon: float) -> tuple[bool, float]:
        """(True, when to start) for a start within ``horizon`` seconds, now reserved; else
        (False, when to come back): half a horizon before its start would be allowed, and an
        interval after the one refused before it (so deferred tasks come back in order, at the
        rate, across all workers). Times are unix seconds on this host's clock."""

    async def acquire(self, task: str, cap: int, holder: str, ttl: float) -> bool:
        """Take a permit for ``holder`` (leased ``ttl`` seconds) if fewer than ``cap`` are held."""

    async def release(self, task: str, holder: str) -> None: ...

    async def renew(self, held: list[tuple[str, str]], ttl: float) -> None:
        """Extend the leases of these (task, holder) permits to ``ttl`` seconds from now."""


# -- Redis -----------------------------------------------------------------------------------

_RESERVE = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local at = tat - tolerance
if at < now then at = now end
if at - now <= horizon then
  local after = tat + interval
  redis.call('SET', KEYS[1], string.format('%.0f', after), 'PX',
             math.ceil((after - now) / 1000) + 1000)
  return {1, string.format('%.0f', at), string.format('%.0f', now)}
end
local back = tonumber(redis.call('GET', KEYS[2]) or '0')
local due = at - horizon / 2
if back > due then due = back end
redis.call('SET', KEYS[2], string.format('%.0f', due + interval), 'PX',
           math.ceil((due + interval - now) / 1000) + 1000)
return {0, string.format('%.0f', due), string.format('%.0f', now)}
"""
)

_ACQUIRE = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[2])
   or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
  return 1
end
return 0
"""
)

_RENEW = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return 0
"""
)

_RELEASE = Script("return redis.call('ZREM', KEYS[1], ARGV[1])")


class RedisLimiter:
    """Limits counted in one Redis for all workers; see the module docstring."""

    shared = True

    def __init__(self, batcher: CommandBatcher, key_prefix: str) -> None:
        self._batcher = batcher
        self._prefix = f"{key_prefix}:limit"
        self._previous = self._current = math.inf
        self._window_began = -math.inf

    def rate_key(self, task: str, rate: Rate) -> str:
        """One per rate: a limit changed at run time starts afresh, not behind the old one's
        schedule (after 1/m, the next start of 100/s is not a minute away)."""
        return f"{self._prefix}:rate:{{{task}}}:{rate.interval * 1e6:.0f}:{rate.burst}"

    def held_key(self, task: str) -> str:
        return f"{self._prefix}:held:{{{task}}}"

    async def reserve(self, task: str, rate: Rate, horizon: float) -> tuple[bool, float]:
        interval = rate.interval * 1e6
        args = [repr(interval), repr(interval * (rate.burst - 1)), repr(horizon * 1e6)]
        key = self.rate_key(task, rate)
        keys = [key, key + ":back"]
        sent = time.time()
        granted, at, now = await _RESERVE.run(self._batcher, keys, args)
        return bool(int(granted)), float(at) / 1e6 - self._offset(float(now) / 1e6 - sent, sent)

    def _offset(self, sample: float, sent: float) -> float:
        """How far the server's clock is ahead of ours, plus the least one-way delay seen.

        Each sample (server time minus our time when the call left) is at least the true
        offset; its minimum over the last two windows is the estimate. Starts are then placed
        where the server put them, whatever this call's own round trip (under load a reply can
        come tens of milliseconds late: starting that much after its receipt would bunch the
        starts of late replies onto those of timely ones)."""
        if sent - self._window_began > _OFFSET_WINDOW:
            self._previous, self._current, self._window_began = self._current, sample, sent
        else:
            self._current = min(self._current, sample)
        return min(self._previous, self._current)

    async def acquire(self, task: str, cap: int, holder: str, ttl: float) -> bool:
        args = [cap, holder, max(1, int(ttl * 1000))]
        return bool(await _ACQUIRE.run(self._batcher, [self.held_key(task)], args))

    async def release(self, task: str, holder: str) -> None:
        await _RELEASE.run(self._batcher, [self.held_key(task)], [holder])

    async def renew(self, held: list[tuple[str, str]], ttl: float) -> None:
        """One script per task (its key alone: a Redis Cluster runs each on the key's node);
        the calls share the batcher's round trip."""
        holders: dict[str, list[str]] = {}
        for task, holder in held:
            holders.setdefault(task, []).append(holder)
        lease = max(1, int(ttl * 1000))
        await asyncio.gather(
            *(
                _RENEW.run(self._batcher, [self.held_key(task)], [lease, *names])
                for task, names in holders.items()
            )
        )


# -- memory ----------------------------------------------------------------------------------


class MemoryLimiter:
    """The same arithmetic in this process (monotonic clock)."""

    def __init__(self, *, shared: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.shared = shared
        self._clock = clock
        self._tat: dict[tuple[str, Rate], float] = {}
        self._back: dict[tuple[str, Rate], float] = {}
        self._held: dict[str, dict[str, float]] = {}

    async def reserve(self, task: str, rate: Rate, horizon: float) -> tuple[bool, float]:
        now = self._clock()
        key = (task, rate)
        tat = max(self._tat.get(key, now), now)
        at = max(now, tat - rate.interval * (rate.burst - 1))
        if at - now <= horizon:
            self._tat[key] = tat + rate.interval
            return True, time.time() + at - now
        due = max(at - horizon / 2, self._back.get(key, 0.0))
        self._back[key] = due + rate.interval
        return False, time.time() + due - now

    async def acquire(self, task: str, cap: int, holder: str, ttl: float) -> bool:
        now = self._clock()
        held = self._held.setdefault(task, {})
        for expired in [h for h, until in held.items() if until <= now]:
            del held[expired]
        if holder in held or len(held) < cap:
            held[holder] = now + ttl
            return True
        return False

    async def release(self, task: str, holder: str) -> None:
        held = self._held.get(task)
        if held is not None:
            held.pop(holder, None)

    async def renew(self, held: list[tuple[str, str]], ttl: float) -> None:
        until = self._clock() + ttl
        for task, holder in held:
            holders = self._held.get(task)
            if holders is not None and holder in holders:
                holders[holder] = until


_memory_limiters: weakref.WeakKeyDictionary[object, MemoryLimiter] = weakref.WeakKeyDictionary()


def limiter_for(app: App) -> Limiter:
    """The result backend's Redis, the broker's Redis, the MemoryBroker's, or this worker's own
    (AMQP with ``rpc://`` results: per worker, there being nowhere shared to count)."""
    from .brokers.memory import MemoryBroker

    backend, broker = app.backend, app.broker
    if type(backend).__name__ == "RedisBackend":
        from .backends.redis import RedisBackend

        assert isinstance(backend, RedisBackend)
        return RedisLimiter(backend.batcher, backend.key_prefix)
    if type(broker).__name__ == "RedisBroker":
        from .brokers.redis import RedisBroker

        assert isinstance(broker, RedisBroker)
        return RedisLimiter(broker.batcher, broker.key_prefix)
    if isinstance(broker, MemoryBroker):
        limiter = _memory_limiters.get(broker)
        if limiter is None:
            limiter = _memory_limiters[broker] = MemoryLimiter(shared=True)
        return limiter
    return MemoryLimiter(shared=False)
