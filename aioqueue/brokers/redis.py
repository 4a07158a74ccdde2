"""Redis broker: reliable queues on plain lists.

Keys for queue ``q`` under prefix ``p`` (the ``{q}`` hash tag keeps one queue's keys in one
Redis Cluster slot)::

    p:{q}                        list   waiting messages; LPUSH to send, taken from the right
    p:{q}:priority:<N>           list   waiting messages of priority N (1..9), created on use;
                                        the order they are taken in: see ``priorities.py``
    p:{q}:priorities             set    {"1"}: exists while a priority list may hold messages
    p:{q}:processing:<worker>    list   messages a worker holds; removed (LREM) on ack
    p:{q}:workers                set    ids of workers consuming q
    p:{q}:alive:<worker>         string heartbeat, expires after worker_heartbeat_ttl
    p:{q}:dead                   list   dead letters: JSON {queue, reason, at, body | body_b64
                                        | body_hex, size (only when the body was cut short)}
    p:{q}:delayed                zset   messages with a future eta, scored by it (unix time)
    p:{q}:delayed:wake           channel  a notice (the eta) for each delayed publish

Priorities: a message sent with priority N > 0 goes to its level's list, with a notice
(``urgent``) on the wake channel in the same round trip, which wakes idle consumers (their BLMOVE
waits on ``p:{q}`` only); the fetch script looks at the levels only while the queue's marker
key exists (set after every push to a level, deleted by the fetch that finds them all empty):
a queue without priorities costs one EXISTS of one key inside the script. Give-back, sweep
and due delayed messages return a message to its own level (the envelope's first key says it).

Delays: a message published with a future eta waits in the sorted set, held by no worker, so it
survives every worker stopping and cannot be run twice for waiting long. Each live consumer runs
a mover (``_redis_delays.py``) that moves due messages to the front of the list in one Lua
script and then sleeps until the next due time (capped at a second), woken early by a notice
when an earlier message is published.

Delivery contract: a message is moved atomically from the queue into the worker's processing
list (a Lua script takes up to the number of free slots at once; BLMOVE waits when the queue is
empty), and leaves it only when the outcome is stored. A worker renews its heartbeat every
``worker_heartbeat_interval``, from a thread of its own (so a blocked event loop does not lose
it) and from the loop; every live worker also sweeps: the processing list of a worker whose
heartbeat expired goes back to the front of its queue with the attempt number raised. There is
no visibility timeout, so a long task whose worker is alive is never run twice.

The heartbeat is a lease, and it is fenced: every settle acts on the message only if it is still
in this worker's own processing list (an ack is LREM on that list; giving back and dead-lettering
are scripts that check it first), and result stores are first-wins (SET NX). A worker that froze
past its TTL (SIGSTOP, a stalled VM) finds its list swept when it wakes, and can neither remove
nor overwrite the newer attempt's message or result. A fetch or BLMOVE whose reply was lost
(the connection died after the server moved the message) is reconciled on the next fetch: what
the list holds beyond what the worker knows it holds is adopted and run.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from functools import partial
from typing import Any

import orjson
from redis import Redis as SyncRedis

from .._redis import (
    CommandBatcher,
    Commands,
    RedisClient,
    Script,
    connect_redis,
    eviction_warning,
    is_cluster_url,
    new_batcher,
    redis_errors_as,
)
from ..config import mask_url
from ..errors import AioQueueError
from ..message import MAX_PRIORITY, priority_of
from ._redis_delays import URGENT, DelayMover
from .base import (
    DEAD_LETTER_PREFIX,
    Consumer,
    DeadLetter,
    Delivery,
    Outgoing,
    QueueStats,
    attempt_of,
    dead_letter_id,
    first_attempt,
    oldest_age,
)
from .priorities import LEVEL_KEY, LOW_TURN, LUA_DESTINATION

__all__ = ["RedisBroker"]

_FETCH_KEYS = 13  # keys the fetch script declares per queue (see _FETCH)

log = logging.getLogger("aioqueue.broker.redis")

# Move up to ARGV[1] messages from a worker's queues into their processing lists, oldest first,
# the queues in the order given: the next queue is read only while fewer than ARGV[1] were
# taken, so one call does what one call per queue did, without a round trip per empty queue.
# Each queue i (from 0) declares FETCH_KEYS keys from KEYS[FETCH_KEYS * i + 1]: its list, its
# processing list, its dead letters, its priority marker and its nine priority lists (read,
# while the marker exists, in the order priorities.py describes), and passes two arguments from
# ARGV[2 * i + 5]: its name (for a dead-letter record) and the count of takes towards the low
# turn. A body longer than ARGV[2] bytes (0: no limit) is not handed out: it goes to the dead
# letters as a record of its size and first ARGV[4] bytes (hex), so no worker ever reads it
# whole; its prefix and size come back so the worker can record FAILURE. ARGV[3] is the time.
# Returns, for each queue read, {moved, refused, new turn count}; a queue not reached has none.
_FETCH = """
local want, max, keep = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
local taken, refusals, replies = 0, 0, {}
local function take(k, name, turns)
  local queue, processing, dead, marker = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
  local out, refused = {}, {}
  local levels = false
  if redis.call('EXISTS', marker) == 1 then
    levels = {}
    for n = 1, 9 do levels[n] = KEYS[k + 4 + n] end
  end
  while taken < want and refusals < 100 do
    local v
    if not levels then
      v = redis.call('RPOP', queue)
    else
      turns = turns + 1
      if turns % LOW_TURN == 0 then
        v = redis.call('RPOP', queue)
        for n = 1, 9 do
          if v then break end
          v = redis.call('RPOP', levels[n])
        end
      else
        for n = 9, 1, -1 do
          v = redis.call('RPOP', levels[n])
          if v then break end
        end
        if not v then v = redis.call('RPOP', queue) end
      end
    end
    if not v then break end
    if max > 0 and string.len(v) > max then
      local head = string.sub(v, 1, keep)
      local hex = string.gsub(head, '.',
        function(c) return string.format('%02x', string.byte(c)) end)
      redis.call('LPUSH', dead, cjson.encode({queue = name, at = tonumber(ARGV[3]),
        size = string.len(v), body_hex = hex,
        reason = 'MessageTooLarge: message is ' .. string.len(v) ..
                 ' bytes, over max_message_size=' .. ARGV[2]}))
      refused[#refused + 1] = head
      refused[#refused + 1] = tostring(string.len(v))
      refusals = refusals + 1
    else
      redis.call('LPUSH', processing, v)
      out[#out + 1] = v
      taken = taken + 1
    end
  end
  if levels and redis.call('EXISTS', unpack(levels)) == 0 then redis.call('DEL', marker) end
  return {out, refused, turns % LOW_TURN}
end
for i = 0, #KEYS / FETCH_KEYS - 1 do
  if taken >= want or refusals >= 100 then break end
  replies[#replies + 1] = take(FETCH_KEYS * i, ARGV[2 * i + 5], tonumber(ARGV[2 * i + 6]))
end
return replies
""".replace("LOW_TURN", str(LOW_TURN)).replace("FETCH_KEYS", str(_FETCH_KEYS))

# Lua: raise the attempt number carried in a '{"attempt":N,' prefix of a JSON body.
_BUMP_ATTEMPT = """
local function bump(v)
  if string.sub(v, 1, 1) ~= '{' then return v end
  local n = string.match(v, '^{"attempt":(%d+),')
  if n then
    return '{"attempt":' .. (tonumber(n) + 1) .. ',' .. string.sub(v, 13 + string.len(n))
  end
  return '{"attempt":2,' .. string.sub(v, 2)
end
"""

# Move a whole processing list KEYS[1] back to the front of queue KEYS[2] (KEYS[2..12]: its
# route, see priorities.py), oldest nearest the front. With ARGV[1] == '1' the attempt is
# raised: the messages were taken and not finished.
_RETURN = (
    _BUMP_ATTEMPT
    + LUA_DESTINATION
    + """
local moved, urgent = 0, false
while true do
  local v = redis.call('LPOP', KEYS[1])
  if not v then break end
  if ARGV[1] == '1' then v = bump(v) end
  local key, up = destination(2, v)
  redis.call('RPUSH', key, v)
  urgent = urgent or up
  moved = moved + 1
end
if urgent then redis.call('PUBLISH', KEYS[2] .. ':delayed:wake', 'urgent') end
return moved
"""
)

# Sweep: of the workers ARGV[1..] registered in set KEYS[1], each one whose heartbeat key
# KEYS[11 + 2i] is gone has its processing list KEYS[12 + 2i] returned to queue KEYS[2]
# (KEYS[2..12]: its route, see priorities.py; each message to its priority's list) with the
# attempt raised, and is forgotten. The worker ids come from an SMEMBERS just before, so every
# key is declared; a worker registered since is swept next time.
_SWEEP = (
    _BUMP_ATTEMPT
    + LUA_DESTINATION
    + """
local moved, urgent = 0, false
for i, wid in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[11 + 2 * i]) == 0 then
    local pkey = KEYS[12 + 2 * i]
    while true do
      local v = redis.call('LPOP', pkey)
      if not v then break end
      v = bump(v)
      local key, up = destination(2, v)
      redis.call('RPUSH', key, v)
      urgent = urgent or up
      moved = moved + 1
    end
    redis.call('SREM', KEYS[1], wid)
  end
end
if urgent then redis.call('PUBLISH', KEYS[2] .. ':delayed:wake', 'urgent') end
return moved
"""
)

# Fenced give-back: only if message ARGV[1] is still in this worker's processing list KEYS[1]
# (its lease was not taken over), push it to the front of queue KEYS[2] (KEYS[2..12]: its
# route; of its priority's list, with a notice), its attempt raised when ARGV[2] == '1', then
# drop it from the list. The write comes before the removal, so a write the server refuses
# (maxmemory) leaves the message where it was.
_GIVE_BACK = (
    _BUMP_ATTEMPT
    + LUA_DESTINATION
    + """
if not redis.call('LPOS', KEYS[1], ARGV[1], 'RANK', -1) then return 0 end
local v = ARGV[1]
if ARGV[2] == '1' then v = bump(v) end
local key, urgent = destination(2, v)
redis.call('RPUSH', key, v)
redis.call('LREM', KEYS[1], -1, ARGV[1])
if urgent then redis.call('PUBLISH', KEYS[2] .. ':delayed:wake', 'urgent') end
return 1
"""
)

# Fenced dead letter: record ARGV[2] in KEYS[2], then drop message ARGV[1] from KEYS[1].
_BURY = """
if not redis.call('LPOS', KEYS[1], ARGV[1], 'RANK', -1) then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('LREM', KEYS[1], -1, ARGV[1])
return 1
"""

# Fenced re-send (a retry): only if message ARGV[1] is still in this worker's processing list
# KEYS[1], add its replacement ARGV[2] to the delayed set KEYS[2] scored by its eta ARGV[3],
# drop the message, and send the wake notice on channel ARGV[4]. One script: a worker that dies
# half-way leaves either the old message (run again) or the new one, never both or neither.
_RESEND = """
if not redis.call('LPOS', KEYS[1], ARGV[1], 'RANK', -1) then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('LREM', KEYS[1], -1, ARGV[1])
redis.call('PUBLISH', ARGV[4], ARGV[3])
return 1
"""

# The waiting messages of every priority list KEYS[1..10] of one queue.
_LENGTH = """
local total = 0
for _, key in ipairs(KEYS) do total = total + redis.call('LLEN', key) end
return total
"""

# Operator view of one queue: KEYS[1..10] its priority lists, KEYS[11] delayed, KEYS[12] dead;
# then for each worker ARGV[i] (from an SMEMBERS of its registry just before) its heartbeat
# KEYS[11 + 2i] and processing list KEYS[12 + 2i]. Returns depth, delayed, in flight, live
# consumers, dead, and the oldest waiting message of each non-empty list (from the right).
_STATS = """
local depth, heads = 0, {}
for i = 1, 10 do
  local n = redis.call('LLEN', KEYS[i])
  if n > 0 then
    depth = depth + n
    table.insert(heads, redis.call('LINDEX', KEYS[i], -1))
  end
end
local inflight, consumers = 0, 0
for i = 1, #ARGV do
  consumers = consumers + redis.call('EXISTS', KEYS[11 + 2 * i])
  inflight = inflight + redis.call('LLEN', KEYS[12 + 2 * i])
end
return {depth, redis.call('ZCARD', KEYS[11]), inflight, consumers, redis.call('LLEN', KEYS[12]),
        heads}
"""

# Purge: delete the waiting lists KEYS[1..10], the delayed set KEYS[11] and the marker KEYS[12];
# returns how many messages they held.
_PURGE = """
local n = redis.call('ZCARD', KEYS[11])
for i = 1, 10 do n = n + redis.call('LLEN', KEYS[i]) end
redis.call('DEL', unpack(KEYS))
return n
"""

# Requeue one dead letter: remove record ARGV[1] from the dead list KEYS[1] and, only if it was
# there, push its body ARGV[2] to list KEYS[2]; for a priority list (ARGV[3] == '1') also set
# the marker KEYS[3] and wake idle consumers on channel ARGV[4]. Atomic: never lost, never twice.
_REQUEUE_DEAD = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[2])
if ARGV[3] == '1' then
  redis.call('SADD', KEYS[3], '1')
  redis.call('PUBLISH', ARGV[4], ARGV[5])
end
return 1
"""

_FETCH_SCRIPT = Script(_FETCH)
_STATS_SCRIPT = Script(_STATS)
_PURGE_SCRIPT = Script(_PURGE)
_REQUEUE_DEAD_SCRIPT = Script(_REQUEUE_DEAD)
_LENGTH_SCRIPT = Script(_LENGTH)
_RETURN_SCRIPT = Script(_RETURN)
_GIVE_BACK_SCRIPT = Script(_GIVE_BACK)
_BURY_SCRIPT = Script(_BURY)
_RESEND_SCRIPT = Script(_RESEND)


class _Keys:
    """Key names of one queue."""

    __slots__ = ("base", "dead", "delayed", "levels", "marker", "queue", "route", "wake", "workers")

    def __init__(self, prefix: str, queue: str) -> None:
        self.queue = f"{prefix}:{{{queue}}}"
        self.base = self.queue + ":"
        self.workers = self.base + "workers"
        self.dead = self.base + "dead"
        self.delayed = self.base + "delayed"
        self.wake = self.delayed + ":wake"
        self.levels = tuple(
            self.queue if n == 0 else f"{self.queue}{LEVEL_KEY}{n}" for n in range(MAX_PRIORITY + 1)
        )
        """The list of each priority, 0 (the queue's own list) to 9."""
        self.marker = self.base + "priorities"
        """Exists while a priority list may hold messages: a plain fetch checks only this."""
        self.route = (self.queue, self.marker, *self.levels[1:])
        """The 11 keys a script that returns messages declares (``LUA_DESTINATION``)."""

    def worker_keys(self, worker_ids: Sequence[str]) -> list[str]:
        """Each worker's heartbeat and processing list, in pairs, for a script's KEYS."""
        keys: list[str] = []
        for worker_id in worker_ids:
            keys += (self.alive(worker_id), self.processing(worker_id))
        return keys

    def processing(self, worker_id: str) -> str:
        return f"{self.base}processing:{worker_id}"

    def alive(self, worker_id: str) -> str:
        return f"{self.base}alive:{worker_id}"


class _RedisDelivery:
    """A message in this worker's processing list; every settle is fenced on it being there."""

    __slots__ = (
        "_consumer",
        "_held",
        "attempt",
        "body",
        "processing",
        "queue",
        "size",
        "taken_at",
    )

    def __init__(self, consumer: _RedisConsumer, queue: str, processing: str, body: bytes) -> None:
        self._consumer = consumer
        self.taken_at = time.monotonic()
        self.processing = processing
        self.queue = queue
        self.body = body
        self.size = len(body)
        self.attempt = attempt_of(body)
        self._held = True
        consumer.hold(queue, body)

    @property
    def redelivered(self) -> bool:
        return self.attempt > 1

    def _release(self) -> None:
        if self._held:
            self._held = False
            self._consumer.release(self.queue, self.body)

    async def ack(self) -> None:
        processing, body = self.processing, self.body

        def stage(pipe: Commands) -> None:
            pipe.lrem(processing, -1, body)

        await self._consumer.broker.batcher.run(stage)
        self._release()

    def stage_ack(self, pipe: Commands) -> None:
        """The ack as a command, for a transaction that also stores the outcome."""
        pipe.lrem(self.processing, -1, self.body)

    def settled(self) -> None:
        """The message left the processing list by a transaction run elsewhere (a joint store)."""
        self._release()

    @property
    def lease_in_doubt(self) -> bool:
        """True if this worker's lease may have lapsed since it took the message: its settle
        must then check the message is still in its list before storing anything."""
        return self._consumer.lease_in_doubt(self.taken_at)

    async def requeue(self, *, count_attempt: bool = False) -> None:
        keys = self._consumer.broker.keys(self.queue)
        await _GIVE_BACK_SCRIPT.run(
            self._consumer.broker.batcher,
            [self.processing, *keys.route],
            [self.body, "1" if count_attempt else "0"],
        )
        self._release()

    async def resend(self, body: bytes, eta: float | None) -> None:
        """Swap the message for ``body`` due at ``eta`` (a retry), atomically and fenced.

        It goes through the delayed set even when due now: the movers put it at the front of
        its queue, the same path every delayed message takes."""
        keys = self._consumer.broker.keys(self.queue)
        when = repr(eta if eta is not None else time.time())
        await _RESEND_SCRIPT.run(
            self._consumer.broker.batcher,
            [self.processing, keys.delayed],
            [self.body, body, when, keys.wake],
        )
        self._release()

    async def dead_letter(self, reason: str, *, keep_body: bool = True) -> None:
        record = self._consumer.broker.dead_record(
            self.queue,
            self.body,
            reason,
            max_size=self._consumer.max_size if keep_body else -1,
        )
        keys = self._consumer.broker.keys(self.queue)
        await _BURY_SCRIPT.run(
            self._consumer.broker.batcher, [self.processing, keys.dead], [self.body, record]
        )
        self._release()


class _RefusedDelivery:
    """An oversized message the fetch script already moved to the dead letters (prefix only).

    The worker still sees it, to record the FAILURE for its task id; settling it is a no-op.
    """

    __slots__ = ("attempt", "body", "queue", "size")

    def __init__(self, queue: str, head: bytes, size: int) -> None:
        self.queue = queue
        self.body = head
        self.size = size
        self.attempt = 1

    @property
    def redelivered(self) -> bool:
        return False

    async def ack(self) -> None:
        return None

    async def requeue(self, *, count_attempt: bool = False) -> None:
        return None

    async def dead_letter(self, reason: str, *, keep_body: bool = True) -> None:
        return None


class _LeaseKeeper:
    """Renews this worker's heartbeat keys from a thread of its own, and knows when in doubt.

    The heartbeat is the lease on everything in the worker's processing lists. Renewed only from
    the event loop, an ``async def`` task that blocks the loop past the TTL would lose it and see
    its messages run again elsewhere, over and over; from a thread, the lease lasts as long as the
    process does. A frozen process (SIGSTOP, a paused VM) or a Redis out of reach still loses it:
    :meth:`in_doubt` tells the settle step when it must use its fenced form.
    """

    def __init__(self, url: str, keys: list[str], *, interval: float, ttl: float) -> None:
        self._url = url
        self._keys = keys
        self._interval = interval
        self._ttl = ttl
        self._timeout = max(0.5, ttl / 2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aioqueue-lease", daemon=True)
        self.renewed_at = time.monotonic()
        """When the last renewal that succeeded was sent (taken before sending: conservative)."""
        self.lapsed_until = -math.inf
        """End of the latest gap between renewals longer than the TTL: the lease may have
        expired before then, and a message taken before then may have been swept."""

    def start(self, renewed_at: float) -> None:
        self.renewed_at = renewed_at
        self._thread.start()

    def in_doubt(self, taken_at: float) -> bool:
        """True if a message taken at ``taken_at`` may no longer be this worker's.

        Either the last renewal is old (the process was frozen, or Redis is out of reach, and
        the thread has not renewed since), or a renewal came after a gap past the TTL. The lapse
        is recorded before the renewal time moves on, so one of the two always shows it.
        """
        if time.monotonic() - self.renewed_at > self._ttl / 2:
            return True
        return taken_at <= self.lapsed_until

    def _run(self) -> None:
        client = _sync_client(self._url, self._timeout)
        ttl_ms = int(self._ttl * 1000)
        failing = False
        try:
            while not self._stop.wait(self._interval):
                started = time.monotonic()
                try:
                    with client.pipeline(transaction=False) as pipe:
                        for key in self._keys:
                            pipe.set(key, b"1", px=ttl_ms)
                        pipe.execute()
                except Exception as exc:  # an outage must not end the thread; the loop retries too
                    if not failing:
                        log.warning("renewing the worker's lease failed: %s", _masked(exc))
                    failing = True
                    continue
                failing = False
                if started - self.renewed_at > self._ttl:
                    self.lapsed_until = started
                    log.warning(
                        "the worker's lease went unrenewed for %.1fs (over its %.1fs TTL): "
                        "messages it held may have been handed to other workers",
                        started - self.renewed_at,
                        self._ttl,
                    )
                self.renewed_at = started
        finally:
            client.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._timeout + 0.5)


def _masked(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {mask_url(str(exc))}"


class _RedisConsumer:
    """One worker's view of its queues: batch fetch, blocking wait, lease, sweep, reconcile."""

    def __init__(
        self, broker: RedisBroker, queues: Sequence[str], worker_id: str, max_size: int | None
    ) -> None:
        self.broker = broker
        self.worker_id = worker_id
        self.queues = tuple(queues)
        self.max_size = max_size
        self.max_hold: float | None = None
        self._keys = {q: broker.keys(q) for q in self.queues}
        self._processing = {q: k.processing(worker_id) for q, k in self._keys.items()}
        self._buffer: list[Delivery] = []
        self._waiters: dict[str, asyncio.Task[bytes]] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        # Resolved when a prioritised message arrives: the wait gives way. One future serves
        # every wait until it fires (no task or future per wait on the idle round trip).
        self._urgent: asyncio.Future[None] | None = None
        self._turns = dict.fromkeys(self.queues, 0)  # takes towards the low turn (priorities.py)
        # The fetch script's keys, built once: for each queue alone, and for all of them.
        self._fetch_keys: dict[tuple[str, ...], list[str]] = {
            (q,): [k.queue, self._processing[q], k.dead, k.marker, *k.levels[1:]]
            for q, k in self._keys.items()
        }
        self._fetch_keys[self.queues] = [key for q in self.queues for key in self._fetch_keys[(q,)]]
        # One fetch call for all queues needs their keys on one server: not on a cluster, where
        # each queue's keys hash to a slot of their own and each queue gets a call of its own.
        self._one_call = isinstance(broker.batcher, CommandBatcher)
        self._mover = DelayMover(broker, list(self._keys.values()), on_urgent=self._on_urgent)
        self._lease: _LeaseKeeper | None = None
        self._blocking: RedisClient | None = None
        self._blockers: dict[str, CommandBatcher] = {}
        # What this worker knows it holds, per queue: a message in its processing list that is
        # not counted here was moved by a command whose reply was lost, and is adopted.
        self._held: dict[str, Counter[bytes]] = {q: Counter() for q in self.queues}
        self._dirty: set[str] = set()

    def _on_urgent(self) -> None:
        if self._urgent is None:
            self._urgent = asyncio.get_running_loop().create_future()
        if not self._urgent.done():
            self._urgent.set_result(None)

    def hold(self, queue: str, body: bytes) -> None:
        self._held[queue][body] += 1

    def release(self, queue: str, body: bytes) -> None:
        held = self._held[queue]
        held[body] -= 1
        if held[body] <= 0:
            del held[body]

    async def start(self) -> None:
        self._lease = _LeaseKeeper(
            self.broker.raw_url,
            [keys.alive(self.worker_id) for keys in self._keys.values()],
            interval=self.broker.heartbeat_interval,
            ttl=self.broker.heartbeat_ttl,
        )
        first_beat = time.monotonic()
        await self._beat()
        self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_loop())
        self._lease.start(first_beat)
        self._mover.start()

    def lease_in_doubt(self, taken_at: float) -> bool:
        """True if a message this worker took at ``taken_at`` may have been swept meanwhile."""
        return self._lease is None or self._lease.in_doubt(taken_at)

    async def fetch(
        self, max_count: int, timeout: float, wake: asyncio.Event | None = None
    ) -> list[Delivery]:
        if self._urgent is not None and self._urgent.done():
            self._urgent = None  # before the fetch script: a notice from now on ends the wait
        self._collect_waits()
        if self._dirty:
            await self._reconcile()
        out = self._take_buffered(max_count)
        if len(out) < max_count:
            if self._one_call:
                out.extend(await self._fetch_batch(self.queues, max_count - len(out)))
            else:
                for queue in self.queues:
                    if len(out) >= max_count:
                        break
                    out.extend(await self._fetch_batch((queue,), max_count - len(out)))
        if out or timeout <= 0 or (wake is not None and wake.is_set()):
            return out
        return await self._wait(max_count, timeout, wake)

    def _take_buffered(self, max_count: int) -> list[Delivery]:
        taken, self._buffer = self._buffer[:max_count], self._buffer[max_count:]
        return taken

    async def _fetch_batch(self, queues: tuple[str, ...], count: int) -> list[Delivery]:
        """Up to ``count`` messages from ``queues`` (all of the worker's, or one), the first ones
        first, in one script call."""
        args: list[object] = [count, self.max_size or 0, time.time(), DEAD_LETTER_PREFIX]
        for queue in queues:
            args += (queue, self._turns[queue])
        try:
            replies = await _FETCH_SCRIPT.run(self.broker.batcher, self._fetch_keys[queues], args)
        except AioQueueError:
            self._dirty.update(queues)  # the script may have run with its reply lost: reconcile
            raise
        out: list[Delivery] = []
        # only the queues the script reached have replies: the call stopped once it had enough
        for queue, (moved, refused, turns) in zip(queues, replies, strict=False):
            self._turns[queue] = turns
            processing = self._processing[queue]
            out += [_RedisDelivery(self, queue, processing, body) for body in moved]
            for index in range(0, len(refused), 2):
                out.append(_RefusedDelivery(queue, refused[index], int(refused[index + 1])))
        return out

    def _collect_waits(self) -> None:
        """Hand out what background BLMOVEs took meanwhile, before fetching anything else, so a
        message they moved never waits while the worker is busy with other queues."""
        for queue, task in list(self._waiters.items()):
            if task.done():
                del self._waiters[queue]
                self._take_wait_result(queue, task)

    def _take_wait_result(self, queue: str, task: asyncio.Task[bytes]) -> None:
        if task.cancelled():
            self._dirty.add(queue)
            return
        error = task.exception()
        if error is not None:
            self._dirty.add(queue)  # the server may have moved one with the reply lost
            raise error
        self._buffer.append(_RedisDelivery(self, queue, self._processing[queue], task.result()))

    async def _reconcile(self) -> None:
        """Adopt messages in our processing lists that we never heard of (a lost reply)."""
        for queue in list(self._dirty):
            if queue in self._waiters:
                continue  # its BLMOVE may still move one: reconcile once it has ended
            processing = self._processing[queue]

            def stage(pipe: Commands, key: str = processing) -> None:
                pipe.lrange(key, 0, -1)

            listed: list[bytes] = await self.broker.batcher.run(stage)
            extra = Counter(listed) - self._held[queue]
            for body, count in extra.items():
                for _ in range(count):
                    self._buffer.append(_RedisDelivery(self, queue, processing, body))
            if extra:
                log.warning(
                    "worker %s adopted %d message(s) on %s whose fetch reply was lost",
                    self.worker_id,
                    sum(extra.values()),
                    queue,
                )
            self._dirty.discard(queue)

    async def _wait(
        self, max_count: int, timeout: float, wake: asyncio.Event | None
    ) -> list[Delivery]:
        """Block until a message arrives on any queue (one BLMOVE per queue), or time out.

        A prioritised message goes to a list no BLMOVE waits on: its notice (see
        ``DelayMover``) ends the wait with nothing, and the worker's next fetch takes it.

        A BLMOVE that is still waiting when this returns stays in flight for the next call, so
        no message it takes is lost; with several queues it can bring at most one message per
        extra queue beyond ``max_count``, which waits in the buffer (already in this worker's
        processing list, so covered by its lease).
        """
        loop = asyncio.get_running_loop()
        for queue in self.queues:
            if queue not in self._waiters:
                self._waiters[queue] = loop.create_task(self._blmove(queue))
        waits: set[asyncio.Future[Any]] = set(self._waiters.values())
        woken = loop.create_task(wake.wait()) if wake is not None else None
        if woken is not None:
            waits.add(woken)
        if self._urgent is None:
            self._urgent = loop.create_future()
        waits.add(self._urgent)
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if woken is not None:
                woken.cancel()
        self._collect_waits()
        return self._take_buffered(max_count)

    async def _blmove(self, queue: str) -> bytes:
        """Wait for one message on ``queue``, on a connection of this queue's own.

        Blocking commands hold their connection, so each queue gets a batcher (one dedicated
        connection) from the consumer's blocking client.
        """
        if self._blocking is None:
            self._blocking = self.broker.new_client("blocking")
        waiter = self._blockers.get(queue)
        if waiter is None:
            waiter = self._blockers[queue] = new_batcher(
                self._blocking, self.broker.errors, self.broker.raw_url
            )
        source, destination = self._keys[queue].queue, self._processing[queue]

        def stage(pipe: Commands) -> None:
            pipe.blmove(source, destination, 1)

        while True:
            body: bytes | None = await waiter.run(stage)
            if body is not None:
                return body

    async def _beat(self) -> None:
        ttl_ms = int(self.broker.heartbeat_ttl * 1000)

        def stage(pipe: Commands, keys: _Keys) -> None:
            # Heartbeat before membership: a sweep between the two must not see us dead.
            pipe.set(keys.alive(self.worker_id), b"1", px=ttl_ms)
            pipe.sadd(keys.workers, self.worker_id)
            pipe.smembers(keys.workers)

        def sweep(pipe: Commands, keys: _Keys, workers: list[str]) -> None:
            # EVAL (not EVALSHA) so a flushed script cache can never fail a heartbeat.
            declared = [*keys.route, *keys.worker_keys(workers)]
            pipe.eval(_SWEEP, len(declared) + 1, keys.workers, *declared, *workers)

        # Per queue, two round trips: the registry is read first so the sweep declares every
        # key it may touch (a cluster routes and checks by the declared keys).
        for queue, keys in self._keys.items():
            members = await self.broker.batcher.run(partial(stage, keys=keys))
            workers = sorted(m.decode() for m in members if m.decode() != self.worker_id)
            if not workers:
                continue
            moved = await self.broker.batcher.run(partial(sweep, keys=keys, workers=workers))
            if moved:
                log.warning(
                    "recovered %d task(s) from dead worker(s): back to queue %s, attempt raised",
                    moved,
                    queue,
                )

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.broker.heartbeat_interval)
            try:
                await self._beat()
            except Exception as exc:  # a broker outage must not kill the worker; retry next beat
                log.warning("heartbeat to %s failed: %s", self.broker.url, exc)

    async def close(self) -> None:
        """Stop waiting, stop beating, and give back everything this worker still holds."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        await self._mover.stop()
        await self._end_waits()
        # Buffered deliveries never started: they go back as they were. Whatever else is left
        # in the processing lists was running when the worker gave up on it: attempt raised.
        for delivery in self._take_buffered(len(self._buffer)):
            await delivery.requeue()
        if self._lease is not None:
            self._lease.stop()
            self._lease = None
        for queue, keys in self._keys.items():
            processing = self._processing[queue]
            await _RETURN_SCRIPT.run(self.broker.batcher, [processing, *keys.route], ["1"])

            def forget(pipe: Commands, keys: _Keys = keys) -> None:
                pipe.srem(keys.workers, self.worker_id)
                pipe.delete(keys.alive(self.worker_id))

            await self.broker.batcher.run(forget)
        for waiter in self._blockers.values():
            await waiter.aclose()
        if self._blocking is not None:
            await self._blocking.aclose()

    async def _end_waits(self) -> None:
        """End in-flight BLMOVEs by closing their connection instead of cancelling them.

        A closed socket makes a blocked read fail at once, wherever it is. A message the server
        moved just before that is in our processing list, and one that came back with a reply
        goes to the buffer: either way it is returned below.
        """
        waiters, self._waiters = self._waiters, {}
        if not waiters:
            return
        for waiter in self._blockers.values():
            await waiter.aclose()
        for queue, task in waiters.items():
            try:
                async with asyncio.timeout(2.0):
                    body = await task
            except (Exception, TimeoutError):
                task.cancel()
                continue
            self._buffer.append(_RedisDelivery(self, queue, self._processing[queue], body))


class RedisBroker:
    """Reliable queues on Redis lists (see the module docstring for the keys and the contract)."""

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "aioqueue",
        connect_timeout: float = 5.0,
        heartbeat_interval: float = 2.0,
        heartbeat_ttl: float = 10.0,
        client_name: str = "aioqueue",
    ) -> None:
        self._raw_url = url
        self.url = mask_url(url)
        self.key_prefix = key_prefix
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_ttl = heartbeat_ttl
        self._connect_timeout = connect_timeout
        self._client_name = client_name
        self.client = self.new_client("main")
        self.batcher = new_batcher(self.client, self.errors, url)
        self._keys: dict[str, _Keys] = {}

    @property
    def raw_url(self) -> str:
        """The URL with its password, for the lease thread's own client: never log it."""
        return self._raw_url

    def new_client(self, role: str) -> RedisClient:
        return connect_redis(
            self._raw_url,
            connect_timeout=self._connect_timeout,
            client_name=f"{self._client_name}:{role}",
        )

    def errors(self) -> contextlib.AbstractContextManager[None]:
        return redis_errors_as(self._raw_url)

    def same_server(self, url: str) -> bool:
        """True when a result backend on ``url`` may share transactions with this broker's
        keys; never on a cluster, where a task's result and its queue live in other slots."""
        return url == self._raw_url and isinstance(self.batcher, CommandBatcher)

    def keys(self, queue: str) -> _Keys:
        keys = self._keys.get(queue)
        if keys is None:
            keys = self._keys[queue] = _Keys(self.key_prefix, queue)
        return keys

    async def connect(self) -> None:
        """Check the server answers, and warn once if it may evict queue keys when full."""
        with self.errors():
            await self.client.ping()
        if not isinstance(self.batcher, CommandBatcher):
            return  # a cluster: CONFIG answers per node (check maxmemory-policy on each)
        warning = await eviction_warning(self.batcher)
        if warning is not None:
            log.warning("%s: %s", self.url, warning)

    async def publish(self, queue: str, body: bytes, *, eta: float | None = None) -> None:
        """LPUSH, or with a future ``eta`` ZADD to the delayed set plus a wake notice (the same
        single round trip either way)."""
        keys = self.keys(queue)
        if eta is not None and eta > time.time():
            delayed, wake = keys.delayed, keys.wake

            def delay(pipe: Commands) -> None:
                pipe.zadd(delayed, eta, body)
                pipe.publish(wake, repr(eta).encode())

            await self.batcher.run(delay)
            return
        level = priority_of(body)
        if level:
            key, wake = keys.levels[level], keys.wake

            marker = keys.marker

            def urgent(pipe: Commands) -> None:
                pipe.lpush(key, body)
                pipe.sadd(marker, "1")  # after the push: never a marker-less waiting message
                pipe.publish(wake, URGENT)

            await self.batcher.run(urgent)
            return
        key = keys.queue

        def stage(pipe: Commands) -> None:
            pipe.lpush(key, body)

        await self.batcher.run(stage)

    async def publish_many(self, items: Sequence[Outgoing]) -> None:
        grouped: dict[str, list[bytes]] = {}
        delayed: dict[_Keys, list[float | bytes]] = {}
        urgent: set[_Keys] = set()  # queues sent prioritised messages
        now = time.time()
        for queue, body, eta in items:
            if eta is not None and eta > now:
                delayed.setdefault(self.keys(queue), []).extend((eta, body))
            elif level := priority_of(body):
                keys = self.keys(queue)
                grouped.setdefault(keys.levels[level], []).append(body)
                urgent.add(keys)
            else:
                grouped.setdefault(self.keys(queue).queue, []).append(body)

        def stage(pipe: Commands) -> None:
            for key, bodies in grouped.items():
                for start in range(0, len(bodies), 1000):
                    pipe.lpush(key, *bodies[start : start + 1000])
            for keys, pairs in delayed.items():
                for start in range(0, len(pairs), 2000):
                    pipe.zadd(keys.delayed, *pairs[start : start + 2000])
                earliest = min(pairs[0::2])
                pipe.publish(keys.wake, repr(earliest).encode())
            for keys in urgent:
                pipe.sadd(keys.marker, "1")
                pipe.publish(keys.wake, URGENT)

        await self.batcher.run(stage)

    def consumer(
        self, queues: Sequence[str], *, worker_id: str, max_size: int | None = None
    ) -> Consumer:
        return _RedisConsumer(self, queues, worker_id, max_size)

    @staticmethod
    def dead_record(queue: str, body: bytes, reason: str, *, max_size: int | None) -> bytes:
        """A dead letter's JSON record: the whole body, or its first bytes when oversized.

        ``max_size=-1``: no byte of the body is kept, only its size.
        """
        record: dict[str, Any] = {"queue": queue, "reason": reason, "at": time.time()}
        if max_size is not None and len(body) > max_size:
            record["size"] = len(body)
            body = body[: DEAD_LETTER_PREFIX if max_size >= 0 else 0]
        try:
            record["body"] = body.decode("utf-8")
        except UnicodeDecodeError:
            record["body_b64"] = base64.b64encode(body).decode("ascii")
        return orjson.dumps(record)

    async def queue_length(self, queue: str) -> int:
        """Waiting messages of every priority (one round trip)."""
        return int(await _LENGTH_SCRIPT.run(self.batcher, list(self.keys(queue).levels), []))

    async def delayed_length(self, queue: str) -> int:
        """Messages of ``queue`` waiting for their eta (not counted by :meth:`queue_length`)."""
        with self.errors():
            return int(await self.client.zcard(self.keys(queue).delayed))

    async def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        with self.errors():
            raw = await self.client.lrange(self.keys(queue).dead, -limit, -1)
        return [_dead_letter(item) for item in reversed(raw)]

    async def queue_stats(self, queue: str) -> QueueStats:
        """One round trip (a script): counts, live consumers, and the heads for the oldest age."""
        keys = self.keys(queue)
        workers = await self._workers_of(keys)
        depth, delayed, in_flight, consumers, dead, heads = await _STATS_SCRIPT.run(
            self.batcher,
            [*keys.levels, keys.delayed, keys.dead, *keys.worker_keys(workers)],
            workers,
        )
        return QueueStats(
            queue=queue,
            depth=int(depth),
            delayed=int(delayed),
            in_flight=int(in_flight),
            consumers=int(consumers),
            oldest_age=oldest_age(heads, time.time()),
            dead=int(dead),
        )

    async def _workers_of(self, keys: _Keys) -> list[str]:
        def stage(pipe: Commands) -> None:
            pipe.smembers(keys.workers)

        return sorted(member.decode() for member in await self.batcher.run(stage))

    async def purge(self, queue: str) -> int:
        keys = self.keys(queue)
        return int(
            await _PURGE_SCRIPT.run(self.batcher, [*keys.levels, keys.delayed, keys.marker], [])
        )

    async def _dead_records(
        self, queue: str, ids: frozenset[str] | None
    ) -> list[tuple[bytes, DeadLetter]]:
        with self.errors():
            raw = await self.client.lrange(self.keys(queue).dead, 0, -1)
        picked = [(record, _dead_letter(record)) for record in raw]
        return [(r, d) for r, d in picked if ids is None or dead_letter_id(d.body) in ids]

    async def requeue_dead(self, queue: str, ids: frozenset[str] | None) -> int:
        keys = self.keys(queue)
        done = 0
        for record, dead in await self._dead_records(queue, ids):
            if dead.size is not None:
                continue  # kept in part only: it cannot run
            body = first_attempt(dead.body)
            level = priority_of(body)
            done += await _REQUEUE_DEAD_SCRIPT.run(
                self.batcher,
                [keys.dead, keys.levels[level], keys.marker],
                [record, body, "1" if level else "0", keys.wake, URGENT],
            )
        return done

    async def drop_dead(self, queue: str, ids: frozenset[str] | None) -> int:
        dead_key = self.keys(queue).dead
        picked = await self._dead_records(queue, ids)
        if not picked:
            return 0

        def stage(pipe: Commands) -> None:
            for record, _ in picked:
                pipe.lrem(dead_key, 1, record)

        await self.batcher.run(stage)
        return len(picked)

    async def aclose(self) -> None:
        await self.batcher.aclose()
        await self.client.aclose()

    def __repr__(self) -> str:
        return f"RedisBroker({self.url!r}, key_prefix={self.key_prefix!r})"


def _sync_client(url: str, timeout: float) -> Any:
    """A blocking client for the lease thread: single-node, or the cluster's for a cluster URL."""
    if is_cluster_url(url):
        from .._redis_cluster import sync_cluster

        return sync_cluster(url, timeout=timeout)
    return SyncRedis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


def _dead_letter(raw: bytes) -> DeadLetter:
    data = orjson.loads(raw)
    if "body" in data:
        body = data["body"].encode()
    elif "body_hex" in data:
        body = bytes.fromhex(data["body_hex"])
    else:
        body = base64.b64decode(data["body_b64"])
    return DeadLetter(
        queue=data["queue"], body=body, reason=data["reason"], at=data["at"], size=data.get("size")
    )
