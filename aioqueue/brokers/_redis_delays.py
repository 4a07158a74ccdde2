"""Delayed messages on Redis: the script that moves due ones, and the consumer's mover.

A message published with a future eta waits in the sorted set ``p:{q}:delayed`` (score: the eta,
unix time), held by no worker: it survives every worker stopping, and waiting long can never get
it run twice (it is in no processing list). Each live consumer runs a :class:`DelayMover` for
its queues; publishers send a wake notice (the eta) on ``p:{q}:delayed:wake`` in the same
pipeline as the ZADD, so a delayed send costs one round trip, as a plain one does.

The same channel carries :data:`URGENT` notices: a prioritised message went to a priority list,
which no BLMOVE waits on, so the mover passes the notice to its consumer (``on_urgent``) to end
its wait. A due delayed message with a priority goes to its priority's list, with that notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from hiredis import pack_command
from redis import exceptions as redis_errors

from .._redis import Script, subscriber_settings
from .._redis_link import RedisLink
from ..errors import AioQueueError
from .priorities import LUA_DESTINATION

if TYPE_CHECKING:
    from .redis import RedisBroker, _Keys

__all__ = ["MAX_DELAY_SLEEP", "URGENT", "DelayMover"]

URGENT = b"urgent"
"""The wake notice for a message put on a priority list (a delay notice carries an eta)."""

log = logging.getLogger("aioqueue.broker.redis")

# Move up to ARGV[2] messages of the delayed set KEYS[1] whose eta is at or before ARGV[1] to the
# front of queue KEYS[2] (KEYS[2..12]: the queue's route, see priorities.py) (RPUSH: they are
# taken next, earliest eta first; a prioritised one to the front of its priority's list, with
# an urgent notice), and return how many
# moved and the next eta still waiting (a string; false when none). Due messages go to the front
# because they already waited their delay: behind a backlog they would be late by all of it.
_MOVE_DUE = (
    LUA_DESTINATION
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #due > 0 then
  local urgent = false
  for i = #due, 1, -1 do
    local key, up = destination(2, due[i])
    redis.call('RPUSH', key, due[i])
    urgent = urgent or up
  end
  if urgent then redis.call('PUBLISH', KEYS[1] .. ':wake', 'urgent') end
  for i = 1, #due, 500 do
    redis.call('ZREM', KEYS[1], unpack(due, i, math.min(i + 499, #due)))
  end
end
local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, head[2] or false}
"""
)

_MOVE_BATCH = 1000
MAX_DELAY_SLEEP = 1.0
"""Longest a mover sleeps between looks at the delayed sets: a lost wake notice (the notice
link down, or a worker that subscribed late) makes a message at most this late."""
_MOVE_DUE_SCRIPT = Script(_MOVE_DUE)


class DelayMover:
    """Moves a consumer's due delayed messages into their queues; sleeps until the next is due.

    After each move it sleeps until the earliest eta still waiting, at most
    :data:`MAX_DELAY_SLEEP`, and no longer than the eta of any wake notice that arrives
    meanwhile (publishers send one per delayed publish on ``p:{q}:delayed:wake``, in the same
    pipeline as the ZADD). So an idle worker with many delayed messages wakes about once a
    second, never polls fast, and an earlier message published during a long sleep is still on
    time. Any number of workers may move at once: the script is atomic, a message moves once.

    The notices come on a connection of the mover's own (a :class:`RedisLink`, our own
    reader, not redis-py's), subscribed before the first move so no notice is missed. Its read
    is timed out at each due time (safe: a StreamReader keeps unread bytes, the parser keeps a
    partial frame) and ended at close by aborting the socket, which makes it fail at once.
    Without it (Redis unreachable) the mover still looks every second.
    """

    def __init__(
        self,
        broker: RedisBroker,
        keys: Sequence[_Keys],
        on_urgent: Callable[[], None] | None = None,
    ) -> None:
        self._on_urgent = on_urgent
        self._broker = broker
        self._keys = tuple(keys)
        self._link: RedisLink | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        link, self._link = self._link, None
        if link is not None:
            link.abort()  # a read waiting for a notice fails at once
        task, self._task = self._task, None
        if task is None:
            return
        try:
            async with asyncio.timeout(2.0):
                await task
        except TimeoutError:
            # stuck in a round trip to an unreachable Redis: the batcher drops that link
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        try:
            while not self._stop.is_set():
                await self._subscribe()
                await self._sleep_until(await self._move_or_warn())
        finally:  # also when cancelled with the loop (a consumer that was never closed)
            link, self._link = self._link, None
            if link is not None:
                link.abort()

    async def _move_or_warn(self) -> float:
        """Move what is due; when to look again (unix time)."""
        try:
            until = min(await self.move_due(), time.time() + MAX_DELAY_SLEEP)
        except AioQueueError as exc:
            if not self._failing:
                log.warning("moving due delayed messages failed: %s", exc)
            self._failing = True
            return time.time() + MAX_DELAY_SLEEP
        except Exception:  # a bug of ours must not end the mover: delays would stop for good
            log.exception("moving due delayed messages failed unexpectedly")
            return time.time() + MAX_DELAY_SLEEP
        self._failing = False
        return until

    async def move_due(self) -> float:
        """Move every due message of our queues; the earliest eta still waiting (or inf)."""
        earliest = math.inf
        for keys in self._keys:
            while True:
                moved, head = await _MOVE_DUE_SCRIPT.run(
                    self._broker.batcher, [keys.delayed, *keys.route], [time.time(), _MOVE_BATCH]
                )
                if moved < _MOVE_BATCH:
                    break
            if head is not None:
                earliest = min(earliest, float(head))
        return earliest

    async def _subscribe(self) -> None:
        if self._link is not None and self._link.usable:
            return
        self._link = None
        try:
            link = await RedisLink.open(await subscriber_settings(self._broker.client))
        except (redis_errors.RedisError, OSError) as exc:
            if not self._failing:
                log.warning("cannot listen for delay notices on %s: %s", self._broker.url, exc)
            return
        channels = [keys.wake for keys in self._keys]
        command: tuple[Any, ...] = ("SUBSCRIBE", *channels)
        try:
            async with asyncio.timeout(MAX_DELAY_SLEEP * 5):
                await link.roundtrip(pack_command(command), len(channels))
        except (redis_errors.RedisError, OSError) as exc:  # OSError includes TimeoutError
            link.abort()
            log.warning("cannot subscribe to delay notices on %s: %s", self._broker.url, exc)
            return
        except BaseException:
            link.abort()
            raise
        if self._stop.is_set():
            link.abort()
        else:
            self._link = link

    async def _sleep_until(self, until: float) -> None:
        """Sleep until ``until`` (unix time), brought forward by any earlier notice."""
        while not self._stop.is_set():
            remaining = until - time.time()
            if remaining <= 0:
                return
            link = self._link
            if link is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._stop.wait()
                continue
            try:
                # a StreamReader read is safe to time out: unread bytes stay buffered
                async with asyncio.timeout(remaining):
                    (frame,) = await link.roundtrip(b"", 1)
            except TimeoutError:
                return
            except (redis_errors.RedisError, OSError):
                link.abort()
                self._link = None  # resubscribed before the next move
                return
            if self._on_urgent is not None and _is_urgent(frame):
                self._on_urgent()
            until = min(until, _notice_eta(frame))


def _is_urgent(frame: Any) -> bool:
    try:
        return bool(frame[0] == b"message" and frame[2] == URGENT)
    except (TypeError, IndexError):
        return False


def _notice_eta(frame: Any) -> float:
    """The eta a wake notice carries (``["message", channel, eta]``); inf for anything else."""
    try:
        if frame[0] == b"message":
            return float(frame[2])
    except (TypeError, ValueError, IndexError):
        pass
    return math.inf
