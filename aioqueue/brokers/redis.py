"""Redis broker: reliable queues on plain lists.

Keys for queue ``q`` under prefix ``p`` (the ``{q}`` hash tag keeps one queue's keys in one
Redis Cluster slot)::

    p:{q}                        list   waiting messages; LPUSH to send, taken from the right
    p:{q}:processing:<worker>    list   messages a worker holds; removed (LREM) on ack
    p:{q}:workers                set    ids of workers consuming q
    p:{q}:alive:<worker>         string heartbeat, expires after worker_heartbeat_ttl
    p:{q}:dead                   list   dead letters: JSON {queue, reason, at, body}

Delivery contract: a message is moved atomically from the queue into the worker's processing
list (a Lua script takes up to the number of free slots at once; BLMOVE waits when the queue is
empty), and leaves it only when the outcome is stored. A worker renews its heartbeat every
``worker_heartbeat_interval``; every live worker also sweeps: the processing list of a worker
whose heartbeat expired goes back to the front of its queue with the attempt number raised.
There is no visibility timeout, so a long task whose worker is alive is never run twice.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import orjson

from .._redis import (
    CommandBatcher,
    Commands,
    RedisClient,
    Script,
    Stage,
    connect_redis,
    redis_errors_as,
)
from ..config import mask_url
from .base import Consumer, DeadLetter, Delivery, attempt_of

__all__ = ["RedisBroker"]

log = logging.getLogger("aioqueue.broker.redis")

# Move up to ARGV[1] messages from the queue into the processing list, oldest first.
_FETCH = """
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local v = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not v then break end
  out[i] = v
end
return out
"""

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

# Move a whole processing list KEYS[1] back to the front of queue KEYS[2], oldest nearest the
# front. With ARGV[1] == '1' the attempt is raised: the messages were taken and not finished.
_RETURN = (
    _BUMP_ATTEMPT
    + """
local moved = 0
while true do
  local v = redis.call('LPOP', KEYS[1])
  if not v then break end
  if ARGV[1] == '1' then v = bump(v) end
  redis.call('RPUSH', KEYS[2], v)
  moved = moved + 1
end
return moved
"""
)

# Sweep: every worker registered in set KEYS[1] whose heartbeat key is gone has its processing
# list returned to queue KEYS[2] with the attempt raised, and is forgotten. ARGV[1] is the
# queue's key base 'p:{q}:'.
_SWEEP = (
    _BUMP_ATTEMPT
    + """
local moved = 0
for _, wid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. 'alive:' .. wid) == 0 then
    local pkey = ARGV[1] .. 'processing:' .. wid
    while true do
      local v = redis.call('LPOP', pkey)
      if not v then break end
      redis.call('RPUSH', KEYS[2], bump(v))
      moved = moved + 1
    end
    redis.call('SREM', KEYS[1], wid)
  end
end
return moved
"""
)


_FETCH_SCRIPT = Script(_FETCH)
_RETURN_SCRIPT = Script(_RETURN)


class _Keys:
    """Key names of one queue."""

    __slots__ = ("base", "dead", "queue", "workers")

    def __init__(self, prefix: str, queue: str) -> None:
        self.queue = f"{prefix}:{{{queue}}}"
        self.base = self.queue + ":"
        self.workers = self.base + "workers"
        self.dead = self.base + "dead"

    def processing(self, worker_id: str) -> str:
        return f"{self.base}processing:{worker_id}"

    def alive(self, worker_id: str) -> str:
        return f"{self.base}alive:{worker_id}"


class _RedisDelivery:
    __slots__ = ("_consumer", "_processing", "attempt", "body", "queue")

    def __init__(self, consumer: _RedisConsumer, queue: str, processing: str, body: bytes) -> None:
        self._consumer = consumer
        self._processing = processing
        self.queue = queue
        self.body = body
        self.attempt = attempt_of(body)

    @property
    def redelivered(self) -> bool:
        return self.attempt > 1

    def stage_ack(self, pipe: Commands) -> None:
        pipe.lrem(self._processing, -1, self.body)

    async def ack(self) -> None:
        await self._consumer.broker.batcher.run(self.stage_ack)

    def on_server(self, url: str) -> bool:
        """True if this delivery's broker is the Redis server (and db) at ``url``."""
        return self._consumer.broker.same_server(url)

    async def ack_after(self, stage: Stage) -> None:
        """Run ``stage`` (a result store) and this ack in one round trip, store first."""

        def both(pipe: Commands) -> None:
            stage(pipe)
            self.stage_ack(pipe)

        await self._consumer.broker.batcher.run(both)

    async def requeue(self) -> None:
        keys = self._consumer.broker.keys(self.queue)
        processing, body = self._processing, self.body

        def stage(pipe: Commands) -> None:
            pipe.lrem(processing, -1, body)
            pipe.rpush(keys.queue, body)

        await self._consumer.broker.batcher.run(stage)

    async def dead_letter(self, reason: str) -> None:
        await self._consumer.broker.bury(self.queue, self._processing, self.body, reason)


class _RedisConsumer:
    """One worker's view of its queues: batch fetch, blocking wait, heartbeat and sweep."""

    def __init__(self, broker: RedisBroker, queues: Sequence[str], worker_id: str) -> None:
        self.broker = broker
        self.worker_id = worker_id
        self.queues = tuple(queues)
        self._keys = {q: broker.keys(q) for q in self.queues}
        self._processing = {q: k.processing(worker_id) for q, k in self._keys.items()}
        self._buffer: list[Delivery] = []
        self._waiters: dict[str, asyncio.Task[bytes]] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._blocking: RedisClient | None = None
        self._blockers: dict[str, CommandBatcher] = {}

    async def start(self) -> None:
        await self._beat()
        self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    async def fetch(self, max_count: int, timeout: float) -> list[Delivery]:
        out = self._take_buffered(max_count)
        for queue in self.queues:
            if len(out) >= max_count:
                break
            out.extend(await self._fetch_batch(queue, max_count - len(out)))
        if out or timeout <= 0:
            return out
        return await self._wait(max_count, timeout)

    def _take_buffered(self, max_count: int) -> list[Delivery]:
        taken, self._buffer = self._buffer[:max_count], self._buffer[max_count:]
        return taken

    async def _fetch_batch(self, queue: str, count: int) -> list[Delivery]:
        keys = self._keys[queue]
        processing = self._processing[queue]
        bodies = await _FETCH_SCRIPT.run(self.broker.batcher, [keys.queue, processing], [count])
        return [_RedisDelivery(self, queue, processing, body) for body in bodies]

    async def _wait(self, max_count: int, timeout: float) -> list[Delivery]:
        """Block until a message arrives on any queue (one BLMOVE per queue), or time out.

        A BLMOVE that is still waiting when this returns stays in flight for the next call, so
        no message it takes is lost; with several queues it can bring at most one message per
        extra queue beyond ``max_count``, which waits in the buffer (already in this worker's
        processing list, so covered by its heartbeat).
        """
        for queue in self.queues:
            if queue not in self._waiters:
                self._waiters[queue] = asyncio.get_running_loop().create_task(self._blmove(queue))
        done, _ = await asyncio.wait(
            self._waiters.values(), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for queue, task in list(self._waiters.items()):
            if task in done:
                del self._waiters[queue]
                body = task.result()  # re-raises a broker error for the worker to handle
                self._buffer.append(_RedisDelivery(self, queue, self._processing[queue], body))
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
            waiter = self._blockers[queue] = CommandBatcher(self._blocking, self.broker.errors)
        source, destination = self._keys[queue].queue, self._processing[queue]

        def stage(pipe: Commands) -> None:
            pipe.blmove(source, destination, 1)

        while True:
            body: bytes | None = await waiter.run(stage)
            if body is not None:
                return body

    async def _beat(self) -> None:
        ttl_ms = int(self.broker.heartbeat_ttl * 1000)

        def stage(pipe: Commands) -> None:
            for keys in self._keys.values():
                # Heartbeat before membership: a sweep between the two must not see us dead.
                pipe.set(keys.alive(self.worker_id), b"1", px=ttl_ms)
                pipe.sadd(keys.workers, self.worker_id)
            for keys in self._keys.values():
                # EVAL (not EVALSHA) so a flushed script cache can never fail a heartbeat.
                pipe.eval(_SWEEP, 2, keys.workers, keys.queue, keys.base)

        await self.broker.batcher.run(stage)

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
        await self._end_waits()
        # Buffered deliveries never started: they go back as they were. Whatever else is left
        # in the processing lists was running when the worker gave up on it: attempt raised.
        for delivery in self._take_buffered(len(self._buffer)):
            await delivery.requeue()
        for queue, keys in self._keys.items():
            processing = self._processing[queue]
            await _RETURN_SCRIPT.run(self.broker.batcher, [processing, keys.queue], ["1"])

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
        self.batcher = CommandBatcher(self.client, self.errors)
        self._keys: dict[str, _Keys] = {}

    def new_client(self, role: str) -> RedisClient:
        return connect_redis(
            self._raw_url,
            connect_timeout=self._connect_timeout,
            client_name=f"{self._client_name}:{role}",
        )

    def errors(self) -> contextlib.AbstractContextManager[None]:
        return redis_errors_as(self._raw_url)

    def same_server(self, url: str) -> bool:
        return url == self._raw_url

    def keys(self, queue: str) -> _Keys:
        keys = self._keys.get(queue)
        if keys is None:
            keys = self._keys[queue] = _Keys(self.key_prefix, queue)
        return keys

    async def connect(self) -> None:
        with self.errors():
            await self.client.ping()

    async def publish(self, queue: str, body: bytes) -> None:
        key = self.keys(queue).queue

        def stage(pipe: Commands) -> None:
            pipe.lpush(key, body)

        await self.batcher.run(stage)

    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        grouped: dict[str, list[bytes]] = {}
        for queue, body in items:
            grouped.setdefault(self.keys(queue).queue, []).append(body)

        def stage(pipe: Commands) -> None:
            for key, bodies in grouped.items():
                for start in range(0, len(bodies), 1000):
                    pipe.lpush(key, *bodies[start : start + 1000])

        await self.batcher.run(stage)

    def consumer(self, queues: Sequence[str], *, worker_id: str) -> Consumer:
        return _RedisConsumer(self, queues, worker_id)

    async def bury(self, queue: str, processing: str | None, body: bytes, reason: str) -> None:
        """Store ``body`` as a dead letter of ``queue`` and drop it from ``processing``."""
        try:
            text: dict[str, Any] = {"body": body.decode("utf-8")}
        except UnicodeDecodeError:
            text = {"body_b64": base64.b64encode(body).decode("ascii")}
        record = orjson.dumps({"queue": queue, "reason": reason, "at": time.time(), **text})
        dead = self.keys(queue).dead

        def stage(pipe: Commands) -> None:
            pipe.lpush(dead, record)
            if processing is not None:
                pipe.lrem(processing, -1, body)

        await self.batcher.run(stage)

    async def queue_length(self, queue: str) -> int:
        with self.errors():
            return int(await self.client.llen(self.keys(queue).queue))

    async def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        with self.errors():
            raw = await self.client.lrange(self.keys(queue).dead, -limit, -1)
        return [_dead_letter(item) for item in reversed(raw)]

    async def aclose(self) -> None:
        await self.batcher.aclose()
        await self.client.aclose()

    def __repr__(self) -> str:
        return f"RedisBroker({self.url!r}, key_prefix={self.key_prefix!r})"


def _dead_letter(raw: bytes) -> DeadLetter:
    data = orjson.loads(raw)
    body = data["body"].encode() if "body" in data else base64.b64decode(data["body_b64"])
    return DeadLetter(queue=data["queue"], body=body, reason=data["reason"], at=data["at"])
