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
  (a bounded cache of the last 10,000, each kept for its result TTL). A restart forgets it.
* ``get()`` and ``wait()`` work only in the sending process, for tasks sent *after* it started
  listening (``async with app`` / ``await app.connect()``). Waiting on a task sent by another
  process, or sent before listening, raises :class:`~aioqueue.errors.ResultBackendError` at once
  instead of hanging. ``forget()`` drops the local copy.
* replies pushed while this process was reconnecting are lost (the exclusive queue dies with its
  connection and is declared again on reconnect); their waiters run into their timeout.
* intermediate states (RECEIVED, STARTED) are pushed to the sender like final outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict

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

__all__ = ["RpcBackend"]

log = logging.getLogger("aioqueue.backend.rpc")

TTL_HEADER = "x-aioqueue-ttl"
_FINAL = "final"
_STATE = "state"
_CACHE_SIZE = 10_000


class _Received:
    """Outcomes this process has been sent: bounded, each entry kept for its TTL."""

    def __init__(self, size: int = _CACHE_SIZE) -> None:
        self._size = size
        self._final: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._states: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    def put(self, kind: str, task_id: str, outcome: bytes, ttl: float) -> None:
        table = self._final if kind == _FINAL else self._states
        table[task_id] = (outcome, time.monotonic() + ttl)
        table.move_to_end(task_id)
        if kind == _FINAL:
            self._states.pop(task_id, None)
        if len(table) > self._size:
            table.popitem(last=False)

    def final(self, task_id: str) -> bytes | None:
        return self._live(self._final, task_id)

    def latest(self, task_id: str) -> bytes | None:
        return self._live(self._final, task_id) or self._live(self._states, task_id)

    def forget(self, task_id: str) -> None:
        self._final.pop(task_id, None)
        self._states.pop(task_id, None)

    @staticmethod
    def _live(table: OrderedDict[str, tuple[bytes, float]], task_id: str) -> bytes | None:
        entry = table.get(task_id)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            del table[task_id]
            return None
        return entry[0]


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
        self._heartbeat = heartbeat
        self._reconnect_interval = reconnect_interval
        self._confirms = publisher_confirms
        self._client_name = client_name
        self._connection: AbstractRobustConnection | None = None
        self._pool: ChannelPool | None = None
        self._reply_queue: str | None = None
        self._epoch = 0
        self._lock: asyncio.Lock | None = None
        self._received = _Received()
        self._waiters: dict[str, asyncio.Future[bytes]] = {}

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
            self._epoch += 1

    def reply_to(self) -> str | None:
        return self._reply_queue

    def send_token(self) -> object:
        return self._epoch if self._reply_queue is not None else None

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
            waiter = self._waiters.pop(task_id, None)
            if waiter is not None and not waiter.done():
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
                await channel.basic_publish(
                    outcome, exchange="", routing_key=reply_to, properties=properties
                )

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
        if token is None or self._reply_queue is None:
            raise ResultBackendError(
                f"rpc:// cannot wait for task {task_id}: its result is pushed only to the "
                "process that sent it, and only if that process was listening when it sent "
                "(use `async with app` or `await app.connect()` before sending, or a "
                "persistent backend such as redis:// to read results from anywhere)"
            )
        waiter = self._waiters.get(task_id)
        if waiter is None or waiter.done():
            waiter = self._waiters[task_id] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(waiter)
        except TimeoutError:
            raise ResultTimeout(f"no result for task {task_id} within {timeout}s") from None
        finally:
            if waiter.done() and self._waiters.get(task_id) is waiter:
                del self._waiters[task_id]

    async def forget(self, task_id: str) -> None:
        self._received.forget(task_id)

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        self._pool = None
        self._reply_queue = None
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(ResultBackendError("the rpc:// result backend was closed"))
                waiter.exception()  # retrieved: no "never retrieved" warning if nobody waits
        self._waiters.clear()
        if connection is not None:
            await close_quietly(connection, self._connect_timeout)

    def __repr__(self) -> str:
        return f"RpcBackend(over {self.broker_url!r}, key_prefix={self.key_prefix!r})"
