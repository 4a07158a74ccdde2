"""``rpc://`` result backend: outcomes travel back to the sender over AMQP, nothing is stored.

Names under prefix ``p`` (``key_prefix``)::

    p.reply.<uuid>   queue   exclusive, auto-delete: one per client process (per App), declared
                             when the App connects (``start_listening``); every ``result.get()``
                             of the process waits on it
    p.claim.<id>     queue   durable, ``x-max-length=1``, ``x-overflow=reject-publish``,
                             ``x-expires`` = the claim's life: only for sends that claim their id
                             (``task_id=``, ``unique_for``); see "Claims" below

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
* intermediate states (RECEIVED, STARTED, PROGRESS...) are pushed to the sender like final
  outcomes, so ``result.watch()`` works there (and only there).

Claims. RabbitMQ stores nothing by key, but a queue that holds at most one message and refuses
the next publish is a test-and-set: a claim publishes one persistent, empty message (mandatory,
confirmed) to ``p.claim.<id>``. RabbitMQ acks it (claimed), nacks it (the queue is full: the id
is held), or returns it (no such queue: it is declared, then the publish is tried again; two
senders racing here both declare, and still only one publish fits). The claim lasts as long as
the queue, whose ``x-expires`` is set when it is declared (publishing does not renew it). The
worker ends a claim when the task is done by deleting the queue and, if the claim must outlive
the task (its result TTL, the rest of ``unique_for``), claiming again for that long, before it
pushes the outcome: a send racing with the task's end, in the moment between the two, can get
through, which a Redis claim (changed in place) cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator
from functools import partial

import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pamqp.commands import Basic
from pamqp.common import FieldTable

from .._amqp import (
    ChannelPool,
    amqp_errors,
    close_quietly,
    connection_name,
    guarded,
    open_connection,
    ready_channel,
)
from ..config import mask_url
from ..errors import ConfigurationError, ResultBackendError, ResultTimeout
from ._pushcache import DEFAULT_MAX_BYTES, PushCache
from ._watch import Watchers

__all__ = ["RpcBackend"]

log = logging.getLogger("aioqueue.backend.rpc")

TTL_HEADER = "x-aioqueue-ttl"
_FINAL = "final"
_STATE = "state"
_STATES_CACHE_BYTES = 4 * 1024 * 1024
_CLAIMED_HERE_MAX = 65536


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
        self._claimed_here: dict[str, str] = {}  # task id -> reply queue it was claimed under
        self._watchers = Watchers()

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
        self._watchers.push(task_id, outcome, kind == _FINAL)
        if kind == _FINAL:
            self._claimed_here.pop(task_id, None)
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
        self,
        task_id: str,
        outcome: bytes,
        *,
        ttl: float,
        reply_to: str | None,
        claim_ttl: float | None = None,
    ) -> None:
        """Push the outcome to the sender's reply queue; without ``reply_to`` nobody waits.

        A claim is settled first: whoever the push wakes must find the id still held.
        """
        if claim_ttl is not None:
            await self.end_claim(task_id, claim_ttl)
        if reply_to is not None:
            await self._push(reply_to, _FINAL, task_id, outcome, ttl)

    # -- claims -------------------------------------------------------------------------

    def _claim_queue(self, task_id: str) -> str:
        name = f"{self.key_prefix}.claim.{task_id}"
        if len(name.encode()) <= 255:  # AMQP's limit on a queue name
            return name
        return f"{self.key_prefix}.claim.sha256-{hashlib.sha256(task_id.encode()).hexdigest()}"

    async def claim(self, task_id: str, ttl: float, *, fresh: bool) -> bool:
        """Publish the one message the id's claim queue takes; see "Claims" above."""
        if not self._confirms:
            raise ConfigurationError(
                "rpc:// can claim task ids (task_id=, unique_for) only with publisher confirms "
                "(amqp_publisher_confirms=False here): a refused publish is how a held claim shows"
            )
        await self.connect()
        name = self._claim_queue(task_id)
        for _ in range(3):  # the queue can expire between our declare and our publish
            taken = await self._publish_claim(name)
            if taken is not None:
                break
            await self._declare_claim(name, ttl)
        else:
            raise ResultBackendError(f"could not claim task id {task_id}: its queue keeps expiring")
        if taken:
            if fresh:
                self._received.forget(task_id)  # an earlier run's outcome, pushed to us
            if self._reply_queue is not None:
                if len(self._claimed_here) >= _CLAIMED_HERE_MAX:
                    del self._claimed_here[next(iter(self._claimed_here))]
                self._claimed_here[task_id] = self._reply_queue
        return taken

    async def _publish_claim(self, name: str) -> bool | None:
        """True: claimed; False: held already (nacked); None: no such queue (returned)."""
        assert self._pool is not None
        with self.errors():
            channel = await self._pool.get(self._connect_timeout)
            with guarded(channel):
                try:
                    reply = await channel.basic_publish(
                        b"",
                        exchange="",
                        routing_key=name,
                        # a new one each time: aiormq writes the message_id it matches a
                        # returned message by into the properties it is given
                        properties=Basic.Properties(delivery_mode=2),
                        mandatory=True,
                        timeout=self._publish_timeout,
                    )
                except aiormq.exceptions.DeliveryError:
                    return False
        return True if isinstance(reply, Basic.Ack) else None

    async def _declare_claim(self, name: str, ttl: float) -> None:
        """Declare the claim queue on a channel of its own: a racing sender that declared it
        with another ``x-expires`` makes RabbitMQ close the channel (406), which is harmless."""
        assert self._connection is not None
        arguments: FieldTable = {
            "x-max-length": 1,
            "x-overflow": "reject-publish",
            "x-expires": max(1, int(ttl * 1000)),
        }
        with self.errors():
            robust = self._connection.channel(publisher_confirms=False)
            try:
                await robust.initialize(timeout=self._connect_timeout)
                channel = await ready_channel(robust, self._connect_timeout)
                with (
                    guarded(channel),
                    contextlib.suppress(aiormq.exceptions.ChannelPreconditionFailed),
                ):
                    await channel.queue_declare(
                        name, durable=True, arguments=arguments, timeout=self._connect_timeout
                    )
            finally:
                await close_quietly(robust, self._connect_timeout)

    async def end_claim(self, task_id: str, claim_ttl: float) -> None:
        """Delete the claim queue, then claim again for ``claim_ttl`` if it must stay held."""
        await self.connect()
        assert self._pool is not None
        with self.errors():
            channel = await self._pool.get(self._connect_timeout)
            with guarded(channel):
                await channel.queue_delete(
                    self._claim_queue(task_id), timeout=self._connect_timeout
                )
        if claim_ttl > 0:
            await self.claim(task_id, claim_ttl, fresh=False)

    async def store_state(
        self, task_id: str, outcome: bytes, *, ttl: float, reply_to: str | None = None
    ) -> None:
        """Push an intermediate state; without ``reply_to``, record it in this process only."""
        if reply_to is not None:
            await self._push(reply_to, _STATE, task_id, outcome, ttl)
        elif self._reply_queue is not None:
            self._record(_STATE, task_id, outcome, ttl)

    async def get(self, task_id: str) -> bytes | None:
        """What this process has received for ``task_id`` (final, else latest state), or None."""
        return self._received.latest(task_id)

    async def wait(self, task_id: str, *, timeout: float | None, token: object = None) -> bytes:
        found = self._received.final(task_id)
        if found is not None:
            return found
        if token is None:  # a duplicate's handle: waitable if this process sent the first
            token = self._claimed_here.get(task_id)
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

    async def watch(self, task_id: str, token: object = None) -> AsyncIterator[bytes]:
        """States pushed to this process for ``task_id``: in the sending process only."""
        final = self._received.final(task_id)
        if final is None:
            self._check_can_wait(task_id, token)
        async for outcome in self._watchers.follow(task_id, partial(self._current, task_id)):
            yield outcome

    def _current(self, task_id: str) -> tuple[bytes | None, bool]:
        final = self._received.final(task_id)
        return (final, True) if final is not None else (self._received.latest(task_id), False)

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
        """Drop the local copy; a claim on the id is not released (it is not ours alone)."""
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
