"""Redis result backend: outcomes under keys with a TTL, waiters woken by pub/sub pushes.

Keys and channels under prefix ``p``::

    p:result:<id>        string   final outcome (SUCCESS / FAILURE), expires after result_ttl
    p:state:<id>         string   latest intermediate state (RECEIVED / STARTED)
    p:claim:<id>         string   the id is taken (task_id= / unique_for sends only): a second
                                  send enqueues nothing; its TTL is set when the outcome is stored
    p:chord:<id>         set      ids of a chord's members counted so far (workflows)
    p:chord-sent:<id>    string   the chord's callback was sent
    p:step:<id>:<n>      string   a workflow step's run n (its retries) is taken, by the token
                                  kept here: its worker renews the lease while it runs (RabbitMQ
                                  brokers; see ``canvas/flows.py``)
    p:done:<id>          channel  a worker publishes here when <id> is stored (any waiter)
    p:watch:<id>         channel  each intermediate state as it is stored (``result.watch()``;
                                  a PUBLISH nobody subscribes to costs Redis a hash lookup)
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
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar, cast

from redis import exceptions as redis_errors

from .._redis import (
    SOCKET_TIMEOUT,
    CommandBatcher,
    Commands,
    Script,
    connect_redis,
    new_batcher,
    redis_errors_as,
)
from ..config import mask_url
from ..errors import ResultBackendError, ResultTimeout
from ..message import MAX_RESULT_TTL, is_valid_ttl
from ._listener import ResultListener, forgotten_channel

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
if KEYS[3] then
  if ARGV[7] == '0' then redis.call('DEL', KEYS[3]) else redis.call('PEXPIRE', KEYS[3], ARGV[7]) end
end
redis.call('LREM', KEYS[1], -1, ARGV[1])
return 1
"""
)

# Claim KEYS[1] for ARGV[1] ms unless it is held; ARGV[2] '1' (fresh: unique_for) deletes an
# earlier run's result KEYS[2] and state KEYS[3], else a result still kept refuses the claim.
_CLAIM = Script(
    """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[2], KEYS[3])
elseif redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return 1
"""
)

# A chord's join: add member ARGV[1] to set KEYS[1] (once, whatever reruns), keep it ARGV[3] ms;
# 1 when all ARGV[2] members are in and the callback was not sent (KEYS[2] is unset).
_CHORD_JOIN = Script(
    """
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) and redis.call('EXISTS', KEYS[2]) == 0 then
  return 1
end
return 0
"""
)

# A workflow step's lease: -1 when its result KEYS[2] is stored; else 0 when step key KEYS[1]
# is set to token ARGV[1] for ARGV[2] ms, or held by that token already; else its PTTL.
_TAKE_STEP = Script(
    """
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
if redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX') then return 0 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 0
end
local left = redis.call('PTTL', KEYS[1])
if left < 1 then return 1 end
return left
"""
)

# Renew a step's lease KEYS[1] by ARGV[2] ms if token ARGV[1] still holds it.
_RENEW_STEP = Script(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
)

log = logging.getLogger("aioqueue.backend.redis")

T = TypeVar("T")
_FETCH_CHUNK = 1000  # keys per MGET when many waiters need a read at once
_MARKER = b"\x00watch:"  # a watcher's own marker; an outcome never starts with a NUL


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
        self.batcher = new_batcher(self.client, self.errors, url)
        # On a cluster a task's keys share a {task_id} hash tag, so the claim script and the
        # result-or-state read see one slot; a single server keeps the plain names.
        cluster = not isinstance(self.batcher, CommandBatcher)
        self._open, self._close = ("{", "}") if cluster else ("", "")
        self._listener: ResultListener | None = None
        self._to_fetch: set[str] = set()
        self._fetcher: asyncio.Task[None] | None = None

    @property
    def connect_url(self) -> str:
        """The URL with its password, for other clients of the same Redis (schedule claims
        under an AMQP broker); ``url`` is the masked one. Never log this."""
        return self._raw_url

    def errors(self) -> contextlib.AbstractContextManager[None]:
        return redis_errors_as(
            self._raw_url, ResultBackendError, ResultBackendError, "result backend"
        )

    def _result_key(self, task_id: str) -> str:
        return f"{self.key_prefix}:result:{self._open}{task_id}{self._close}"

    def _state_key(self, task_id: str) -> str:
        return f"{self.key_prefix}:state:{self._open}{task_id}{self._close}"

    def _claim_key(self, task_id: str) -> str:
        return f"{self.key_prefix}:claim:{self._open}{task_id}{self._close}"

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
        if not isinstance(self.batcher, CommandBatcher):
            from .._redis_cluster import subscriber_connection

            return subscriber_connection(self.client, self._raw_url, SOCKET_TIMEOUT)
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
        self,
        pipe: Commands,
        task_id: str,
        outcome: bytes,
        ttl: float,
        reply_to: str | None,
        claim_ttl: float | None = None,
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
        if claim_ttl is not None:
            self._stage_end_claim(pipe, task_id, claim_ttl)

    def _stage_end_claim(self, pipe: Commands, task_id: str, claim_ttl: float) -> None:
        """PEXPIRE the claim (a lapsed one stays lapsed: the result key guards it), or DEL it."""
        px = _claim_px(claim_ttl)
        if px:
            pipe.pexpire(self._claim_key(task_id), px)
        else:
            pipe.delete(self._claim_key(task_id))

    async def store(
        self,
        task_id: str,
        outcome: bytes,
        *,
        ttl: float,
        reply_to: str | None,
        claim_ttl: float | None = None,
    ) -> None:
        """Store a final outcome unless one is stored already (first wins), and wake waiters."""

        def stage(pipe: Commands) -> None:
            self.stage_store(pipe, task_id, outcome, ttl, reply_to, claim_ttl)
            pipe.exec()

        await self.batcher.run(stage)

    def _step_key(self, task_id: str, run: int) -> str:
        return f"{self.key_prefix}:step:{self._open}{task_id}{self._close}:{run}"

    async def take_step(self, task_id: str, run: int, token: str, lease: float) -> float:
        """One script call (see ``LeasesSteps``): the step key SET NX with a PX lease, unless
        the step's result is stored or another token holds it."""
        keys = [self._step_key(task_id, run), self._result_key(task_id)]
        found = int(await _TAKE_STEP.run(self.batcher, keys, [token, _px(lease)]))
        return -1.0 if found < 0 else found / 1000

    async def renew_step(self, task_id: str, run: int, token: str, lease: float) -> bool:
        keys = [self._step_key(task_id, run)]
        return bool(await _RENEW_STEP.run(self.batcher, keys, [token, _px(lease)]))

    def chord_keys(self, chord_id: str) -> list[str]:
        """A chord's member set and its callback's sent marker (see ``canvas/redis_settle.py``)."""
        return [f"{self.key_prefix}:chord:{chord_id}", f"{self.key_prefix}:chord-sent:{chord_id}"]

    def result_key(self, task_id: str) -> str:
        return self._result_key(task_id)

    def store_arguments(self, task_id: str, ttl: float, reply_to: str | None) -> list[Any]:
        """The reply channel (or ''), push head and done channel of a store, for a script."""
        return self._store_arguments(task_id, b"", ttl, reply_to)[2:]

    @staticmethod
    def px(ttl: float) -> int:
        return _px(ttl)

    async def chord_join(self, chord_id: str, member_id: str, total: int, ttl: float) -> bool:
        """Count ``member_id`` once in the chord (one script: atomic across workers); True
        when all ``total`` are in and the callback was not sent yet."""
        keys = self.chord_keys(chord_id)
        return bool(await _CHORD_JOIN.run(self.batcher, keys, [member_id, total, _px(ttl)]))

    async def chord_sent(self, chord_id: str, ttl: float) -> None:
        key, px = self.chord_keys(chord_id)[1], _px(ttl)

        def stage(pipe: Commands) -> None:
            pipe.set(key, b"1", px=px)

        await self.batcher.run(stage)

    async def broadcast(self, task_id: str, outcome: bytes, *, ttl: float) -> int:
        """Push an outcome to every listening client's reply channel; returns how many.

        For an outcome stored by someone other than the worker that ran the task (a revoke):
        the process that sent it waits on its reply channel alone, and no worker will push
        there until it takes the message. Rare, so one PUBSUB CHANNELS per call is fine.
        """
        frame = f"{task_id} {ttl!r} ".encode() + outcome
        with self.errors():
            channels = await self.client.pubsub_channels(f"{self.key_prefix}:reply:*")
            if channels:
                async with self.client.pipeline(transaction=False) as pipe:
                    for channel in channels:
                        pipe.publish(channel, frame)
                    await pipe.execute()
        return len(channels)

    def shares_server_with(self, broker: object) -> bool:
        """True when ``broker`` is a Redis broker on this very server and database."""
        from ..brokers.redis import RedisBroker

        return isinstance(broker, RedisBroker) and broker.same_server(self._raw_url)

    async def store_and_ack(
        self,
        delivery: Delivery,
        task_id: str,
        outcome: bytes,
        *,
        ttl: float,
        reply_to: str | None,
        claim_ttl: float | None = None,
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
            keys = [redis_delivery.processing, self._result_key(task_id)]
            args = [redis_delivery.body, *self._store_arguments(task_id, outcome, ttl, reply_to)]
            if claim_ttl is not None:
                keys.append(self._claim_key(task_id))
                args.append(_claim_px(claim_ttl))
            held = await _FENCED_STORE_AND_ACK.run(self.batcher, keys, args)
            redis_delivery.settled()
            return bool(held)

        def stage(pipe: Commands) -> None:
            self.stage_store(pipe, task_id, outcome, ttl, reply_to, claim_ttl)
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
        channel = self._watch_channel(task_id)

        def stage(pipe: Commands) -> None:
            # SET before PUBLISH, no transaction needed: a watcher's read that falls between
            # them sees the new state, and its push, arriving after, repeats it (not yielded).
            pipe.set(key, outcome, px=px)
            pipe.publish(channel, outcome)

        await self.batcher.run(stage)

    def _watch_channel(self, task_id: str) -> str:
        return f"{self.key_prefix}:watch:{task_id}"

    async def watch(self, task_id: str, token: object = None) -> AsyncIterator[bytes]:
        """Subscribe ``watch:<id>`` and ``done:<id>`` on a connection of its own, then read the
        keys and publish a marker in one transaction: pushes before the marker are older than
        the read, pushes after it newer, so the read slots in without loss or reordering.
        After a lost connection it does the same again (a state skipped meanwhile is missed,
        the latest is not)."""
        seen: list[bytes | None] = [None]
        backoff = 0.05
        while True:
            try:
                async for outcome, final in self._watch_once(task_id, seen):
                    yield outcome
                    if final:
                        return
                    backoff = 0.05
            except ResultBackendError as exc:
                if _permanent(exc):
                    raise
                log.warning("watching %s: %s; subscribing again", task_id, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _subscribe_and_read(
        self, pubsub: Any, task_id: str, watch: str, done: str, marker: bytes
    ) -> tuple[bytes | None, bytes | None]:
        """(final outcome, latest state) read after both subscriptions are confirmed, in one
        transaction with the marker's PUBLISH."""
        with self.errors():
            await pubsub.subscribe(watch, done)
            confirmed = 0
            while confirmed < 2:
                message = await pubsub.get_message(timeout=10.0)
                if message is None:
                    raise ConnectionError("no subscription confirmation within 10s")
                confirmed += message["type"] == "subscribe"
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.get(self._result_key(task_id))
                pipe.get(self._state_key(task_id))
                pipe.publish(watch, marker)
                stored, state, _ = await pipe.execute()
        return stored, state

    async def _watch_once(
        self, task_id: str, seen: list[bytes | None]
    ) -> AsyncIterator[tuple[bytes, bool]]:
        watch, done = self._watch_channel(task_id), f"{self.key_prefix}:done:{task_id}"
        marker = _MARKER + uuid.uuid4().hex.encode()
        pubsub = self.client.pubsub()
        try:
            stored, state = await self._subscribe_and_read(pubsub, task_id, watch, done, marker)
            done_bytes = done.encode()
            while True:
                with self.errors():
                    message = await pubsub.get_message(timeout=30.0)
                if message is None:
                    continue
                if message["type"] == "subscribe":  # redis-py subscribed again: start over
                    raise ResultBackendError("the watch subscription was re-established")
                if message["type"] != "message":
                    continue
                data: bytes | None = message["data"]
                if message["channel"] == done_bytes or (data == marker and stored is not None):
                    if message["channel"] == done_bytes:
                        with self.errors():
                            stored = await self.client.get(self._result_key(task_id))
                    if stored is not None:
                        yield stored, True
                        return
                    continue
                if data == marker:
                    data = state
                if data is not None and not data.startswith(_MARKER) and data != seen[0]:
                    seen[0] = data
                    yield data, False
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def get(self, task_id: str) -> bytes | None:
        listener = self._listener
        if listener is not None:
            cached = listener.cache.get(task_id, known_ttl_only=True)
            if cached is not None:
                return cached  # the sending process: no round trip
        keys = (self._result_key(task_id), self._state_key(task_id))
        final, state = await self.batcher.run(partial(_mget, keys=keys))
        return cast(bytes | None, final if final is not None else state)

    async def get_many(self, task_ids: Sequence[str]) -> list[bytes | None]:
        """:meth:`get` for each id, the reads ``_FETCH_CHUNK`` keys to an MGET."""
        listener = self._listener
        found: list[bytes | None] = [
            listener.cache.get(task_id, known_ttl_only=True) if listener is not None else None
            for task_id in task_ids
        ]
        missing = [i for i, value in enumerate(found) if value is None]
        step = _FETCH_CHUNK // 2  # two keys per id: its final outcome, then its state
        for start in range(0, len(missing), step):
            chunk = missing[start : start + step]
            keys = tuple(
                key
                for i in chunk
                for key in (self._result_key(task_ids[i]), self._state_key(task_ids[i]))
            )
            values = await self.batcher.run(partial(_mget, keys=keys))
            for n, i in enumerate(chunk):
                final, state = values[2 * n], values[2 * n + 1]
                found[i] = final if final is not None else state
        return found

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
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        try:
            async with asyncio.timeout_at(deadline):  # the listener's start counts too
                await listener.start()
        except TimeoutError:
            raise ResultTimeout(
                f"no result for task {task_id} within {timeout}s (the result listener on "
                f"{listener.url} was not listening yet)"
            ) from None
        cached = listener.cache.get(task_id)
        if cached is not None:
            return cached
        waiter = listener.register(task_id)
        pushed_to_us = token is not None and token == listener.token()
        try:
            async with asyncio.timeout_at(deadline):
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
        """Delete the id's result, state and claim, and tell every process listening under this
        prefix to drop its pushed copy (a requeued dead letter runs again under its id: a copy
        of the old failure kept anywhere would answer ``get()`` in place of the new run)."""
        if self._listener is not None:
            self._listener.cache.pop(task_id)
        keys = (self._result_key(task_id), self._state_key(task_id), self._claim_key(task_id))
        channel = forgotten_channel(self.key_prefix)
        await self.batcher.run(partial(_delete, keys=keys, notice=(channel, task_id)))

    async def claim(self, task_id: str, ttl: float, *, fresh: bool) -> bool:
        """One script call: the claim key SET unless held (or, for an explicit id, unless a
        result is still kept); ``fresh`` deletes an earlier run's result instead."""
        keys = [self._claim_key(task_id), self._result_key(task_id), self._state_key(task_id)]
        taken = bool(await _CLAIM.run(self.batcher, keys, [_px(ttl), "1" if fresh else "0"]))
        if taken and fresh and self._listener is not None:
            self._listener.cache.pop(task_id)  # an earlier run's outcome pushed to us
        return taken

    async def end_claim(self, task_id: str, claim_ttl: float) -> None:
        await self.batcher.run(partial(self._stage_end_claim, task_id=task_id, claim_ttl=claim_ttl))

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


def _claim_px(claim_ttl: float) -> int:
    """A claim's remaining life in ms for PEXPIRE; 0 means release it (DEL)."""
    return 0 if claim_ttl <= 0 else max(1, int(claim_ttl * 1000))


def _ping(pipe: Commands) -> None:
    pipe.ping()


def _get(pipe: Commands, key: str) -> None:
    pipe.get(key)


def _mget(pipe: Commands, keys: tuple[str, ...]) -> None:
    pipe.mget(*keys)


def _delete(pipe: Commands, keys: tuple[str, ...], notice: tuple[str, str]) -> None:
    pipe.delete(*keys)
    channel, task_id = notice
    pipe.publish(channel, task_id.encode())


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
