"""Redis result backend: outcomes under keys with a TTL, waiters woken by pub/sub pushes.

Keys and channels under prefix ``p``::

    p:result:<id>        string   final outcome (SUCCESS / FAILURE), expires after result_ttl
    p:state:<id>         string   latest intermediate state (RECEIVED / STARTED)
    p:done:<id>          channel  a worker publishes here when <id> is stored (any waiter)
    p:reply:<client>     channel  a worker publishes ``<id> <ttl seconds> <outcome>`` here for
                                  the process that sent the task (named in its reply_to)

A client process uses two connections for any number of waiters: the listener's pub/sub
connection (``_listener.py``) and the command batcher's, through which every read (the key
after subscribing, the reads a ``done`` notice or a reconnect triggers, ``get`` for ``state()``)
and ``forget`` go, coalesced into one round trip per batch. No read takes a pool connection.

The sending process already listens on its reply channel before it sends, so its ``get()`` needs
no subscription and no read: the outcome arrives by itself, and is kept in a byte-bounded cache
for its TTL (or until ``forget()``) so a wait that starts after the push still finds it. A
waiter that may have missed the push (the task was sent by another process or another listener,
the listener reconnected, or the cache dropped an entry since the send) subscribes to
``p:done:<id>`` first and reads the key second, so a result stored before the wait began is
never missed. While Redis is unreachable a waiter keeps waiting (reads are retried, the listener
reconnects and reads again); only its timeout ends the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar, cast

from redis import exceptions as redis_errors

from .._redis import CommandBatcher, Commands, Script, connect_redis, redis_errors_as
from ..config import mask_url
from ..errors import ResultBackendError, ResultTimeout
from ..message import MAX_RESULT_TTL, is_valid_ttl
from ._listener import ResultListener

if TYPE_CHECKING:
    from ..brokers.base import Delivery
    from ..brokers.redis import _RedisDelivery

__all__ = ["RedisBackend"]

# The fenced settle: only if the message ARGV[1] is still in the worker's processing list
# KEYS[1] (searched from the tail, where the oldest are), store its outcome (SET NX of KEYS[2],
# then the pushes), then remove it. The store comes before the removal, so a refused write
# leaves the message where it was.
_FENCED_STORE_AND_ACK = Script(
    """
if not redis.call('LPOS', KEYS[1], ARGV[1], 'RANK', -1) then return 0 end
if redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3], 'NX') then
  if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[4], ARGV[5] .. ARGV[2]) end
  redis.call('PUBLISH', ARGV[6], '')
end
redis.call('LREM', KEYS[1], -1, ARGV[1])
return 1
"""
)

log = logging.getLogger("aioqueue.backend.redis")

T = TypeVar("T")
_FETCH_CHUNK = 1000  # keys per MGET when many waiters need a read at once


class RedisBackend:
    """Outcomes in Redis with a TTL; see the module docstring for keys and wake-ups."""

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "aioqueue",
        connect_timeout: float = 5.0,
        client_name: str = "aioqueue",
    ) -> None:
        self._raw_url = url
        self.url = mask_url(url)
        self.key_prefix = key_prefix
        self.client = connect_redis(
            url, connect_timeout=connect_timeout, client_name=f"{client_name}:results"
        )
        self.batcher = CommandBatcher(self.client, self.errors)
        self._listener: ResultListener | None = None
        self._to_fetch: set[str] = set()
        self._fetcher: asyncio.Task[None] | None = None

    def errors(self) -> contextlib.AbstractContextManager[None]:
        return redis_errors_as(
            self._raw_url, ResultBackendError, ResultBackendError, "result backend"
        )

    def _result_key(self, task_id: str) -> str:
        return f"{self.key_prefix}:result:{task_id}"

    def _state_key(self, task_id: str) -> str:
        return f"{self.key_prefix}:state:{task_id}"

    @property
    def listener(self) -> ResultListener:
        if self._listener is None:
            self._listener = ResultListener(
                key_prefix=self.key_prefix,
                url=self.url,
                new_connection=self._pubsub_connection,
                fetch=self._fetch_soon,
            )
        return self._listener

    def _pubsub_connection(self) -> Any:
        """A connection of the listener's own, outside the pool (it never goes back to it).

        Built like the pool builds its connections, but always RESP2: the listener reads
        pub/sub frames as plain arrays.
        """
        pool = self.client.connection_pool
        return pool.connection_class(**{**pool.connection_kwargs, "protocol": 2})

    async def connect(self) -> None:
        await self.batcher.run(_ping)

    async def start_listening(self) -> None:
        """Subscribe the reply channel now (senders call this before their first send)."""
        await self.listener.start()

    def reply_to(self) -> str | None:
        # Only once the listener runs: a send-only process must not be sent every outcome.
        listener = self._listener
        return listener.channel if listener is not None and listener.epoch else None

    def send_token(self) -> object:
        listener = self._listener
        return listener.token() if listener is not None else None

    def stage_store(
        self, pipe: Commands, task_id: str, outcome: bytes, ttl: float, reply_to: str | None
    ) -> None:
        """A final store as one transaction: SET NX (the first outcome wins), then the pushes.

        MULTI/EXEC rather than a Lua script: Redis refuses a transaction whole when it is out of
        memory (the SET is refused as it is queued, and EXEC aborts), which is what makes an
        ack in the same transaction safe; and a transaction costs Redis a fraction of a script
        call. The pushes go out even for a duplicate run whose SET found a result already; the
        listener keeps the first push it gets for a task, which is the stored one.
        """
        pipe.multi()
        pipe.set(self._result_key(task_id), outcome, px=_px(ttl), nx=True)
        if reply_to is not None:
            pipe.publish(reply_to, f"{task_id} {ttl!r} ".encode() + outcome)
        pipe.publish(f"{self.key_prefix}:done:{task_id}", b"")

    async def store(
        self, task_id: str, outcome: bytes, *, ttl: float, reply_to: str | None
    ) -> None:
        """Store a final outcome unless one is stored already (first wins), and wake waiters."""

        def stage(pipe: Commands) -> None:
            self.stage_store(pipe, task_id, outcome, ttl, reply_to)
            pipe.exec()

        await self.batcher.run(stage)

    def shares_server_with(self, broker: object) -> bool:
        """True when ``broker`` is a Redis broker on this very server and database."""
        from ..brokers.redis import RedisBroker

        return isinstance(broker, RedisBroker) and broker.same_server(self._raw_url)

    async def store_and_ack(
        self, delivery: Delivery, task_id: str, outcome: bytes, *, ttl: float, reply_to: str | None
    ) -> bool:
        """Store (first wins) and ack in one step on the broker's own Redis.

        While the worker's lease is known to be held, one MULTI/EXEC transaction: a store the
        server refuses (maxmemory) aborts it, so the message stays unacked. When the lease may
        have lapsed since the message was taken (the process froze, Redis was out of reach),
        the fenced script instead: it stores nothing unless the message is still in the
        worker's processing list, so a worker that woke up late writes no result at all.
        Returns whether the worker still held the message.
        """
        redis_delivery = cast("_RedisDelivery", delivery)
        if redis_delivery.lease_in_doubt:
            held = await _FENCED_STORE_AND_ACK.run(
                self.batcher,
                [redis_delivery.processing, self._result_key(task_id)],
                [redis_delivery.body, *self._store_arguments(task_id, outcome, ttl, reply_to)],
            )
            redis_delivery.settled()
            return bool(held)

        def stage(pipe: Commands) -> None:
            self.stage_store(pipe, task_id, outcome, ttl, reply_to)
            redis_delivery.stage_ack(pipe)
            pipe.exec()

        replies = await self.batcher.run(stage)
        redis_delivery.settled()
        return bool(replies[-1])  # LREM's count: 0 if the message was no longer ours

    def _store_arguments(
        self, task_id: str, outcome: bytes, ttl: float, reply_to: str | None
    ) -> list[Any]:
        head = f"{task_id} {ttl!r} ".encode() if reply_to is not None else b""
        done = f"{self.key_prefix}:done:{task_id}"
        return [outcome, _px(ttl), reply_to or "", head, done]

    async def store_state(
        self, task_id: str, outcome: bytes, *, ttl: float, reply_to: str | None = None
    ) -> None:
        key, px = self._state_key(task_id), max(1, int(ttl * 1000))

        def stage(pipe: Commands) -> None:
            pipe.set(key, outcome, px=px)

        await self.batcher.run(stage)

    async def get(self, task_id: str) -> bytes | None:
        listener = self._listener
        if listener is not None:
            cached = listener.cache.get(task_id, known_ttl_only=True)
            if cached is not None:
                return cached  # the sending process: no round trip
        keys = (self._result_key(task_id), self._state_key(task_id))
        final, state = await self.batcher.run(partial(_mget, keys=keys))
        return cast(bytes | None, final if final is not None else state)

    def _fetch_soon(self, task_ids: Iterable[str]) -> None:
        """Read these ids' outcomes in the background and hand them to their waiters."""
        self._to_fetch.update(task_ids)
        if self._fetcher is None or self._fetcher.done():
            self._fetcher = asyncio.get_running_loop().create_task(self._fetch_pending())

    async def _fetch_pending(self) -> None:
        """MGET what is asked for, in chunks; on an outage retry while someone still waits."""
        backoff = 0.05
        while self._to_fetch and self._listener is not None:
            listener = self._listener
            task_ids = [task_id for task_id in self._to_fetch if listener.waiting(task_id)]
            self._to_fetch.clear()
            done = 0
            try:
                for done in range(0, len(task_ids), _FETCH_CHUNK):
                    chunk = task_ids[done : done + _FETCH_CHUNK]
                    keys = tuple(self._result_key(task_id) for task_id in chunk)
                    values = await self.batcher.run(partial(_mget, keys=keys))
                    for task_id, value in zip(chunk, values, strict=True):
                        if value is not None:
                            listener.wake(task_id, value)
                backoff = 0.05
            except ResultBackendError as exc:
                if _permanent(exc):
                    for task_id in task_ids[done:]:
                        listener.fail(task_id, exc)
                    continue
                # Warn once per outage; the listener logs its reconnects as well.
                (log.debug if backoff > 0.05 else log.warning)(
                    "could not read %d result(s): %s; retrying in %.2fs",
                    len(task_ids) - done,
                    exc,
                    backoff,
                )
                self._to_fetch.update(task_ids[done:])
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _read_final(self, task_id: str) -> bytes | None:
        """The stored outcome, or None; while Redis is away, None and a read in the background."""
        stage = partial(_get, key=self._result_key(task_id))
        try:
            return cast(bytes | None, await _uncancelled(self.batcher.run(stage)))
        except ResultBackendError as exc:
            if _permanent(exc):
                raise
            self._fetch_soon((task_id,))
            return None

    async def wait(self, task_id: str, *, timeout: float | None, token: object = None) -> bytes:
        listener = self.listener
        await listener.start()
        cached = listener.cache.get(task_id)
        if cached is not None:
            return cached
        waiter = listener.register(task_id)
        pushed_to_us = token is not None and token == listener.token()
        try:
            async with asyncio.timeout(timeout):
                if not pushed_to_us:
                    await asyncio.shield(listener.acquire_done(task_id))
                    stored = await self._read_final(task_id)
                    if stored is not None:
                        return stored
                return await waiter
        except TimeoutError:
            raise ResultTimeout(f"no result for task {task_id} within {timeout}s") from None
        finally:
            listener.unregister(task_id, waiter)
            if not pushed_to_us:
                listener.release_done(task_id)

    async def forget(self, task_id: str) -> None:
        if self._listener is not None:
            self._listener.cache.pop(task_id)
        keys = (self._result_key(task_id), self._state_key(task_id))
        await self.batcher.run(partial(_delete, keys=keys))

    async def aclose(self) -> None:
        if self._fetcher is not None:
            self._fetcher.cancel()
            await asyncio.wait({self._fetcher}, timeout=2.0)
        if self._listener is not None:
            await self._listener.aclose()
            self._listener = None
        await self.batcher.aclose()
        await self.client.aclose()

    def __repr__(self) -> str:
        return f"RedisBackend({self.url!r}, key_prefix={self.key_prefix!r})"


def _ping(pipe: Commands) -> None:
    pipe.ping()


def _get(pipe: Commands, key: str) -> None:
    pipe.get(key)


def _mget(pipe: Commands, keys: tuple[str, ...]) -> None:
    pipe.mget(*keys)


def _delete(pipe: Commands, keys: tuple[str, ...]) -> None:
    pipe.delete(*keys)


def _permanent(exc: ResultBackendError) -> bool:
    """An error reply from Redis (ACL, wrong type...): reading again will not help."""
    cause = exc.__cause__
    return isinstance(cause, redis_errors.ResponseError) and not isinstance(
        cause, redis_errors.BusyLoadingError
    )


async def _uncancelled(awaitable: Awaitable[T]) -> T:
    """Await in a task of its own, so a waiter's timeout never cuts a shared round trip."""
    task = asyncio.ensure_future(awaitable)
    task.add_done_callback(_retrieve)
    return await asyncio.shield(task)


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _px(ttl: float) -> int:
    """The TTL in milliseconds, refused here if Redis would refuse it: inside a transaction a
    value Redis rejects fails only its own command, and the ack beside it would still run."""
    if not is_valid_ttl(ttl):
        raise ResultBackendError(
            f"result TTL {ttl!r} is out of range (0 < ttl <= {MAX_RESULT_TTL:.0f}s)"
        )
    return max(1, int(ttl * 1000))
