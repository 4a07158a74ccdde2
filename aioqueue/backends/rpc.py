"""``rpc://`` result backend: outcomes travel back to the sender over AMQP, nothing is stored.

Names under prefix ``p`` (``key_prefix``)::

    p.reply.<uuid>   queue   exclusive, auto-delete: one per client process (per App), declared
                             when the App connects (``start_listening``); every ``result.get()``
                             of the process waits on it

A worker's ``store(task_id, outcome, reply_to=...)`` publishes the outcome to the queue named in
the message's ``reply_to``, through the default exchange, transient and *without* the mandatory
flag: when the caller is gone its queue is gone too and RabbitMQ drops the reply, so results
nobody waits for never pile up. The publish is confirm-awaited, so the worker acks the task only
once RabbitMQ has the reply. Frames carry the task id as ``correlation_id``, the kind
(``final`` / ``state``) as ``type`` and the result TTL in the ``x-aioqueue-ttl`` header.

What this backend is not:

* **not persistent**: an outcome exists only in the memory of the process that sent the task
  (a cache bounded by bytes, 16 MiB, oldest out first; each outcome kept for its result TTL).
  A restart forgets it; an outcome larger than the bound reaches only a waiter already waiting.
* ``get()`` and ``wait()`` work only in the sending process, for tasks sent *after* it started
  listening (``async with app`` / ``await app.connect()``) on the reply queue it still listens
  on. Waiting on a task sent by another process, sent before listening, sent before the App
  was closed and connected again (its reply went to a queue that is gone), or whose outcome
  the cache had to drop, raises :class:`~aioqueue.errors.ResultBackendError` at once instead of
  hanging. ``forget()`` drops the local copy.
* replies pushed while this process was reconnecting are lost (the exclusive queue dies with its
  connection and is declared again on reconnect); their waiters run into their timeout.
* intermediate states (RECEIVED, STARTED) are pushed to the sender like final outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pamqp.commands import Basic

from .._amqp import (
    ChannelPool,
    amqp_errors,
    close_quietly,
    connection_name,
    guarded,
    open_connection,
)
from ..config import mask_url
from ..errors import ResultBackendError, ResultTimeout
from ._pushcache import DEFAULT_MAX_BYTES, PushCache

__all__ = ["RpcBackend"]

log = logging.getLogger("aioqueue.backend.rpc")

TTL_HEADER = "x-aioqueue-ttl"
_FINAL = "final"
_STATE = "state"
_STATES_CACHE_BYTES = 4 * 1024 * 1024


class _Received:
    """Outcomes this process has been sent: byte-bounded, each entry kept for its TTL."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.finals = PushCache(max_bytes)
        self._states = PushCache(min(max_bytes, _STATES_CACHE_BYTES))

    def put(self, kind: str, task_id: str, outcome: bytes, ttl: float) -> None:
        if kind == _FINAL:
            self.finals.put(task_id, outcome, ttl)
            self._states.pop(task_id)
        else:
            self._states.put(task_id, outcome, ttl)

    def final(self, task_id: str) -> bytes | None:
        return self.finals.get(task_id)

    def latest(self, task_id: str) -> bytes | None:
        return self.finals.get(task_id) or self._states.get(task_id)

    def forget(self, task_id: str) -> None:
        self.finals.pop(task_id)
        self._states.pop(task_id)


class RpcBackend:
    """Results pushed to the sending process's reply queue; see the module docstring."""

    persistent = False
    """Outcomes are not stored anywhere a fresh process (or a fresh handle on a task sent
    without ``reply_to``) could read them: tests and tools check this capability."""

    def __init__(
        self,
        broker_url: str,
        *,
        key_prefix: str = "aioqueue",
        connect_timeout: float = 5.0,
        publish_timeout: float = 30.0,
        heartbeat: float = 60.0,
        reconnect_interval: float = 1.0,
        publisher_confirms: bool = True,
        client_name: str = "aioqueue",
    ) -> None:
        self._raw_url = broker_url
        self.url = "rpc://"
        self.broker_url = mask_url(broker_url)
        self.key_prefix = key_prefix
        self._connect_timeout = connect_timeout
        self._publish_timeout = publish_timeout
        self._heartbeat = heartbeat
        self._reconnect_interval = reconnect_interval
        self._confirms = publisher_confirms
        self._client_name = client_name
        self._connection: AbstractRobustConnection | None = None
        self._pool: ChannelPool | None = None
        self._reply_queue: str | None = None
        self._lock: asyncio.Lock | None = None
        self._received = _Received()
        self._waiters: dict[str, list[asyncio.Future[bytes]]] = {}

    def errors(self) -> contextlib.AbstractContextManager[None]:
        return amqp_errors(
            self._raw_url, ResultBackendError, ResultBackendError, "rpc result backend"
        )

    def _guard(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def connect(self) -> None:
        if self._connection is not None:
            return
        async with self._guard():
            if self._connection is None:
                connection = await open_connection(
                    self._raw_url,
                    name=connection_name(self._client_name, "results"),
                    timeout=self._connect_timeout,
                    heartbeat=self._heartbeat,
                    reconnect_interval=self._reconnect_interval,
                    error=ResultBackendError,
                )
                self._pool = ChannelPool(connection, 2, self._confirms)
                self._connection = connection

    async def start_listening(self) -> None:
        """Declare this process's reply queue and consume it (the App calls this on connect)."""
        await self.connect()
        async with self._guard():
            if self._reply_queue is not None:
                return
            assert self._connection is not None
            name = f"{self.key_prefix}.reply.{uuid.uuid4().hex}"
            with self.errors():
                channel = self._connection.channel(publisher_confirms=False)
                await channel.initialize(timeout=self._connect_timeout)
                # Robust: after a reconnect the queue is declared again under the same name
                # and the consumer restored, so reply_to addresses stay valid.
                queue = await channel.declare_queue(name, exclusive=True, auto_delete=True)
                await queue.consume(self._on_reply, no_ack=True)
            self._reply_queue = name

    def reply_to(self) -> str | None:
        return self._reply_queue

    def send_token(self) -> object:
        # The reply queue's name identifies this listener: a handle from before the App was
        # closed and connected again carries the old name, whose replies nobody receives now.
        return self._reply_queue

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        task_id = message.correlation_id
        if task_id is None:
            return
        ttl = message.headers.get(TTL_HEADER)
        self._record(
            message.type or _FINAL,
            task_id,
            message.body,
            float(ttl) if isinstance(ttl, int | float) else 86400.0,
        )

    def _record(self, kind: str, task_id: str, outcome: bytes, ttl: float) -> None:
        self._received.put(kind, task_id, outcome, ttl)
        if kind == _FINAL:
            for waiter in self._waiters.pop(task_id, ()):
                if not waiter.done():
                    waiter.set_result(outcome)

    async def _push(
        self, reply_to: str, kind: str, task_id: str, outcome: bytes, ttl: float
    ) -> None:
        await self.connect()
        assert self._pool is not None
        properties = Basic.Properties(
            correlation_id=task_id,
            message_type=kind,
            delivery_mode=1,
            headers={TTL_HEADER: float(ttl)},
        )
        with self.errors():
            channel = await self._pool.get(self._connect_timeout)
            with guarded(channel):
                try:
                    await channel.basic_publish(
                        outcome,
                        exchange="",
                        routing_key=reply_to,
                        properties=properties,
                        timeout=self._publish_timeout,
                    )
                except TimeoutError as exc:
                    raise ResultBackendError(
                        f"{self.broker_url} did not confirm a reply within "
                        f"{self._publish_timeout}s; it may or may not have been queued"
                    ) from exc

    async def store(
        self, task_id: str, outcome: bytes, *, ttl: float, reply_to: str | None
    ) -> None:
        """Push the outcome to the sender's reply queue; without ``reply_to`` nobody waits."""
        if reply_to is not None:
            await self._push(reply_to, _FINAL, task_id, outcome, ttl)

    async def store_state(
        self, task_id: str, outcome: bytes, *, ttl: float, reply_to: str | None = None
    ) -> None:
        """Push an intermediate state; without ``reply_to``, record it in this process only."""
        if reply_to is not None:
            await self._push(reply_to, _STATE, task_id, outcome, ttl)
        elif self._reply_queue is not None:
            self._received.put(_STATE, task_id, outcome, ttl)

    async def get(self, task_id: str) -> bytes | None:
        """What this process has received for ``task_id`` (final, else latest state), or None."""
        return self._received.latest(task_id)

    async def wait(self, task_id: str, *, timeout: float | None, token: object = None) -> bytes:
        found = self._received.final(task_id)
        if found is not None:
            return found
        self._check_can_wait(task_id, token)
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(task_id, [])
        waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError:
            raise ResultTimeout(f"no result for task {task_id} within {timeout}s") from None
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters and self._waiters.get(task_id) is waiters:
                del self._waiters[task_id]

    def _check_can_wait(self, task_id: str, token: object) -> None:
        """Raise at once where no reply can come, instead of letting the caller hang."""
        prefix = f"rpc:// cannot wait for task {task_id}: "
        if token is None or self._reply_queue is None:
            raise ResultBackendError(
                prefix + "its result is pushed only to the process that sent it, and only if "
                "that process was listening when it sent (use `async with app` or "
                "`await app.connect()` before sending, or a persistent backend such as "
                "redis:// to read results from anywhere)"
            )
        if token != self._reply_queue:
            raise ResultBackendError(
                prefix + "its result was pushed to a reply queue this process no longer "
                "listens on (the app was closed and connected again after sending it); use a "
                "persistent backend such as redis:// to read results across reconnects"
            )
        if self._received.finals.was_dropped(task_id):
            raise ResultBackendError(
                prefix + "its outcome arrived but was dropped from the bounded cache of "
                "received outcomes before anyone waited for it (wait sooner, or use a "
                "persistent backend such as redis://)"
            )

    async def forget(self, task_id: str) -> None:
        self._received.forget(task_id)

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        self._pool = None
        self._reply_queue = None
        closed = ResultBackendError("the rpc:// result backend was closed")
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(closed)
                    waiter.exception()  # retrieved: no "never retrieved" warning if nobody waits
        self._waiters.clear()
        if connection is not None:
            await close_quietly(connection, self._connect_timeout)

    def __repr__(self) -> str:
        return f"RpcBackend(over {self.broker_url!r}, key_prefix={self.key_prefix!r})"
