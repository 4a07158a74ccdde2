"""Redis result backend: outcomes under keys with a TTL, waiters woken by pub/sub pushes.

Keys and channels under prefix ``p``::

    p:result:<id>        string   final outcome (SUCCESS / FAILURE), expires after result_ttl
    p:state:<id>         string   latest intermediate state (RECEIVED / STARTED)
    p:done:<id>          channel  a worker publishes here when <id> is stored (any waiter)
    p:reply:<client>     channel  a worker publishes the whole outcome here for the process
                                  that sent the task (its id travels in the message's reply_to)

One pub/sub connection per client process serves every waiter. The sending process already
listens on its reply channel before it sends, so its ``get()`` needs no subscription and no
read: the outcome arrives by itself. Outcomes pushed to this process are kept in a bounded
cache of recent ones, so a wait that starts after the push still finds them. A waiter that may
have missed a push (the task was sent by another process, the listener reconnected, or the
cache overflowed) subscribes to ``p:done:<id>`` first and
reads the key second, so a result stored before the wait began is never missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from functools import partial
from typing import Any, cast

from .._redis import CommandBatcher, Commands, connect_redis, redis_errors_as
from ..config import mask_url
from ..errors import ResultBackendError, ResultTimeout

__all__ = ["RedisBackend"]

log = logging.getLogger("aioqueue.backend.redis")

_RECENT_CACHE_SIZE = 10_000
# The listener reads with a timeout of its own: redis-py before 8.0 would otherwise cut a
# blocking pub/sub read at the client's socket timeout and drop the subscription. Between
# slices redis-py's health check pings a quiet connection, so a silently dead one is found.
_READ_SLICE = 10.0


class _Listener:
    """The process's one pub/sub connection, fanned out to every waiting coroutine."""

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend
        self.channel = f"{backend.key_prefix}:reply:{uuid.uuid4().hex}"
        self.epoch = 0
        self.evictions = 0
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._waiters: dict[str, asyncio.Future[bytes]] = {}
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._subscribed: dict[str, asyncio.Future[None]] = {}
        self._done_prefix = f"{backend.key_prefix}:done:".encode()
        self._closing = False

    async def start(self) -> None:
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
            self._reader = asyncio.get_running_loop().create_task(self._read_forever())
        await asyncio.shield(self._ready)

    async def _read_forever(self) -> None:
        backoff = 0.05
        while not self._closing:
            try:
                await self._connect_and_read()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._ready is not None and not self._ready.done():
                    self._ready.set_exception(
                        ResultBackendError(f"cannot listen on {self._backend.url}: {exc}")
                    )
                    self._ready = None
                    self._reader = None
                    return
                log.warning("result listener lost %s (%s); reconnecting", self._backend.url, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _connect_and_read(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        self._pubsub = self._backend.client.pubsub()
        await self._pubsub.subscribe(self.channel, *[c for c in self._subscribed])
        while True:
            message = await self._pubsub.get_message(timeout=_READ_SLICE)
            if message is not None:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind, channel = message["type"], message["channel"]
        if kind == "subscribe":
            if channel == self.channel.encode():
                self._on_subscribed()
            else:
                future = self._subscribed.get(channel.decode())
                if future is not None and not future.done():
                    future.set_result(None)
        elif kind == "message":
            if channel.startswith(self._done_prefix):
                task_id = channel[len(self._done_prefix) :].decode()
                self._backend.spawn_fetch(task_id)
            else:
                self._deliver_reply(message["data"])

    def _on_subscribed(self) -> None:
        self.epoch += 1
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)
        elif self._waiters:
            # Reconnected: pushes may have been missed while we were away; read the keys.
            for task_id in list(self._waiters):
                self._backend.spawn_fetch(task_id)

    def _deliver_reply(self, data: bytes) -> None:
        # Reply frames are b"<task id> <outcome>" so the id needs no JSON parse here.
        task_id_bytes, _, outcome = data.partition(b" ")
        self.resolve(task_id_bytes.decode(), outcome)

    def resolve(self, task_id: str, outcome: bytes) -> None:
        waiter = self._waiters.pop(task_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(outcome)
        # Kept even when a waiter took it: another handle on the same id may ask later, and
        # it must find the outcome here, since the push that carried it will not come again.
        self._recent[task_id] = outcome
        if len(self._recent) > _RECENT_CACHE_SIZE:
            self._recent.popitem(last=False)
            self.evictions += 1

    def recent(self, task_id: str) -> bytes | None:
        return self._recent.get(task_id)

    def register(self, task_id: str) -> asyncio.Future[bytes]:
        waiter = self._waiters.get(task_id)
        if waiter is None or waiter.done():
            waiter = self._waiters[task_id] = asyncio.get_running_loop().create_future()
        return waiter

    def unregister(self, task_id: str, waiter: asyncio.Future[bytes]) -> None:
        if self._waiters.get(task_id) is waiter:
            del self._waiters[task_id]

    async def subscribe_done(self, task_id: str) -> None:
        channel = f"{self._backend.key_prefix}:done:{task_id}"
        confirmed = self._subscribed.get(channel)
        if confirmed is None:
            confirmed = asyncio.get_running_loop().create_future()
            self._subscribed[channel] = confirmed
            assert self._pubsub is not None
            await self._pubsub.subscribe(channel)
        await confirmed

    async def unsubscribe_done(self, task_id: str) -> None:
        channel = f"{self._backend.key_prefix}:done:{task_id}"
        if self._subscribed.pop(channel, None) is not None and self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.unsubscribe(channel)

    async def aclose(self) -> None:
        """Close the socket under the reader first, then cancel it where it waits to retry.

        A redis-py read cancelled mid-flight can get stuck in its own cleanup; a read on a
        closed socket fails at once and leaves the reader in its back-off sleep.
        """
        self._closing = True
        connection = getattr(self._pubsub, "connection", None)
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.disconnect(nowait=True)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait({self._reader}, timeout=2.0)
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()


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
        self._listener: _Listener | None = None
        self._fetches: set[asyncio.Task[None]] = set()

    def errors(self) -> contextlib.AbstractContextManager[None]:
        return redis_errors_as(
            self._raw_url, ResultBackendError, ResultBackendError, "result backend"
        )

    def _result_key(self, task_id: str) -> str:
        return f"{self.key_prefix}:result:{task_id}"

    def _state_key(self, task_id: str) -> str:
        return f"{self.key_prefix}:state:{task_id}"

    @property
    def listener(self) -> _Listener:
        if self._listener is None:
            self._listener = _Listener(self)
        return self._listener

    async def connect(self) -> None:
        with self.errors():
            await self.client.ping()

    async def start_listening(self) -> None:
        """Subscribe the reply channel now (senders call this before their first send)."""
        with self.errors():
            await self.listener.start()

    def reply_to(self) -> str | None:
        # Only once the listener runs: a send-only process must not be sent every outcome.
        listener = self._listener
        return listener.channel if listener is not None and listener.epoch else None

    def send_token(self) -> object:
        listener = self._listener
        if listener is None or not listener.epoch:
            return None
        return (listener.epoch, listener.evictions)

    def stage_store(
        self, pipe: Commands, task_id: str, outcome: bytes, ttl: float, reply_to: str | None
    ) -> None:
        """Add a final store and its wake-ups to a pipeline (lets a broker ack in the same trip)."""
        pipe.set(self._result_key(task_id), outcome, px=max(1, int(ttl * 1000)))
        if reply_to is not None:
            pipe.publish(reply_to, task_id.encode() + b" " + outcome)
        pipe.publish(f"{self.key_prefix}:done:{task_id}", b"")

    async def store(
        self, task_id: str, outcome: bytes, *, ttl: float, reply_to: str | None
    ) -> None:
        await self.batcher.run(
            partial(self.stage_store, task_id=task_id, outcome=outcome, ttl=ttl, reply_to=reply_to)
        )

    async def store_and_ack(
        self, delivery: object, task_id: str, outcome: bytes, *, ttl: float, reply_to: str | None
    ) -> bool:
        """Store and ack in one round trip when the delivery came from this same Redis.

        Returns False (nothing done) otherwise; the worker then stores and acks in turn. The
        store still runs first inside the batch, so a crash between them means a redelivery,
        never a lost outcome.
        """
        on_server = getattr(delivery, "on_server", None)
        if on_server is None or not on_server(self._raw_url):
            return False
        stage = partial(
            self.stage_store, task_id=task_id, outcome=outcome, ttl=ttl, reply_to=reply_to
        )
        await delivery.ack_after(stage)  # type: ignore[attr-defined]
        return True

    async def store_state(
        self, task_id: str, outcome: bytes, *, ttl: float, reply_to: str | None = None
    ) -> None:
        key, px = self._state_key(task_id), max(1, int(ttl * 1000))

        def stage(pipe: Commands) -> None:
            pipe.set(key, outcome, px=px)

        await self.batcher.run(stage)

    async def get(self, task_id: str) -> bytes | None:
        with self.errors():
            final, state = await self.client.mget(
                self._result_key(task_id), self._state_key(task_id)
            )
        return cast(bytes | None, final if final is not None else state)

    def spawn_fetch(self, task_id: str) -> None:
        """Read a stored outcome in the background and hand it to its waiter."""
        task = asyncio.get_running_loop().create_task(self._fetch_into_listener(task_id))
        self._fetches.add(task)
        task.add_done_callback(self._fetches.discard)

    async def _fetch_into_listener(self, task_id: str) -> None:
        try:
            with self.errors():
                outcome = await self.client.get(self._result_key(task_id))
        except ResultBackendError as exc:
            log.warning("could not read result of %s: %s", task_id, exc)
            return
        if outcome is not None:
            self.listener.resolve(task_id, outcome)

    async def wait(self, task_id: str, *, timeout: float | None, token: object = None) -> bytes:
        listener = self.listener
        with self.errors():
            await listener.start()
        recent = listener.recent(task_id)
        if recent is not None:
            return recent
        waiter = listener.register(task_id)
        pushed_to_us = token is not None and token == (listener.epoch, listener.evictions)
        try:
            async with asyncio.timeout(timeout):
                if not pushed_to_us:
                    with self.errors():
                        await listener.subscribe_done(task_id)
                        stored = await self.client.get(self._result_key(task_id))
                    if stored is not None:
                        return cast(bytes, stored)
                return await waiter
        except TimeoutError:
            raise ResultTimeout(f"no result for task {task_id} within {timeout}s") from None
        finally:
            listener.unregister(task_id, waiter)
            if not pushed_to_us:
                await listener.unsubscribe_done(task_id)

    async def forget(self, task_id: str) -> None:
        with self.errors():
            await self.client.delete(self._result_key(task_id), self._state_key(task_id))

    async def aclose(self) -> None:
        for task in list(self._fetches):
            task.cancel()
        if self._listener is not None:
            await self._listener.aclose()
            self._listener = None
        await self.batcher.aclose()
        await self.client.aclose()

    def __repr__(self) -> str:
        return f"RedisBackend({self.url!r}, key_prefix={self.key_prefix!r})"
