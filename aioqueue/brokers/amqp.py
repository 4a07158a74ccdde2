"""AMQP broker (RabbitMQ through aio-pika): durable queues, publisher confirms, manual acks.

Names for task queue ``q`` under prefix ``p`` (``key_prefix``, so several apps or test runs can
share one vhost without seeing each other's messages)::

    p.q              queue     durable; classic (default) or quorum (``amqp_queue_type``);
                               x-dead-letter-exchange=p.dead, x-dead-letter-routing-key=p.q.dead;
                               quorum queues also get x-delivery-limit (``amqp_delivery_limit``),
                               classic ones x-max-priority=9 when ``amqp_priorities`` is on
    p.dead           exchange  direct, durable: the dead-letter exchange of every queue of p
    p.q.dead         queue     durable, bound to p.dead with key p.q.dead: the dead letters of q
    p.q.delay.<N>ms  queue     durable, same type as p.q, declared on first use: a delay bucket
                               x-message-ttl=N, x-dead-letter-exchange="" and
                               x-dead-letter-routing-key=p.q (quorum: at-least-once
                               dead-lettering, x-overflow=reject-publish); N = 2^k seconds in ms,
                               k = -5 .. 16 (31 ms .. 65,536 s)

Sending publishes to the default exchange with routing key ``p.q``: persistent, ``mandatory``
(a queue deleted under us is an error, not a silent drop), on one of a small fixed pool of
confirm-mode channels (``amqp_channel_pool_size``). ``publish`` returns once RabbitMQ confirmed;
a nack, a return or a lost connection raises :class:`~aioqueue.errors.BrokerError`. Concurrent
sends share the channels and their confirms are in flight together, so a thousand ``send()``
calls cost a window of confirms, not a thousand round trips one after another. The queue is
declared (once per process) before its first message is sent to it.

Delays (``publish(..., eta=)``), without plugins and without head-of-line blocking: a message
due in ``d`` seconds is published to the largest bucket whose TTL is at most ``d``, with its eta
in the ``x-aioqueue-eta`` header. Every message of a bucket has the same TTL, so the bucket
expires them in the order they came, each at its time, back into ``p.q``. It comes out at most
``d`` after it went in, so never late by the bucket: if it is still not due, the consumer that
receives it publishes it (confirmed, then acks it) to the largest bucket at most the time left,
and hands it to the worker only when less than the smallest bucket (31 ms) remains. Every hop at
least halves the time left, so a delay crosses a few buckets (a few more for a long one), and
the lateness is one hop's, not their sum (each hop is chosen from the absolute eta). While it
waits a delayed message is persistent in RabbitMQ and unacked nowhere: it survives every worker
stopping and is never redelivered for having waited long. A delay under 31 ms, or an eta in
the past, is published straight to ``p.q`` exactly as without one. Caveats: a classic queue
dead-letters at most once (a node crash at the moment of expiry can lose the message; a quorum
bucket dead-letters at least once), and a work queue deleted while messages wait in its buckets
drops them as they expire.

Priorities (``amqp_priorities``, off by default: x-max-priority cost a worker's drain about 30%
in our benchmark; while off, a prioritised send is refused, never ignored): classic work queues
are declared with x-max-priority=9, and a message's priority (the envelope's first key, read from
the body's first bytes) is its AMQP ``priority`` property on every publish. Delay buckets keep
it: they have no x-max-priority (a TTL bucket must stay FIFO), and RabbitMQ keeps the property
when a message expires into ``p.q``. RabbitMQ then delivers the highest priority first,
strictly. Arguments of an existing queue cannot change: a queue declared with the setting the
other way fails the declare with PRECONDITION_FAILED, raised as a ConfigurationError saying what
to do. Quorum queues take no x-max-priority (RabbitMQ 4.0 gives them two levels, older ones
none), so with ``amqp_queue_type="quorum"`` a prioritised send is refused.

Delivery contract (consumers, prefetch, acks): see :mod:`aioqueue.brokers.amqp_consumer`.

Dead letters: bad input is published to ``p.dead`` (so into ``p.q.dead``) with the reason in the
``x-aioqueue-reason`` header, confirm-awaited, and only then is the original acked. A quorum
queue dead-letters by itself a message delivered more than ``x-delivery-limit`` times (a task
that crashes its workers); its reason then comes from the ``x-death`` header
(``delivery_limit``). ``dead_letters()`` reads them with ``basic.get`` on a short-lived channel
and closes it, which puts them all back in order.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp.commands import Basic

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
from ..errors import BrokerError, ConfigurationError
from ..message import MAX_PRIORITY, priority_of
from .amqp_consumer import ATTEMPT_HEADER, DELAY_BUCKETS_MS, ETA_HEADER, MIN_DELAY, _AmqpConsumer
from .amqp_probe import Prober
from .base import (
    DEAD_LETTER_PREFIX,
    Consumer,
    DeadLetter,
    Outgoing,
    QueueStats,
    dead_letter_id,
    first_attempt,
)

__all__ = [
    "AmqpBroker",
    "ChannelPool",
    "amqp_errors",
    "connection_name",
    "delay_bucket",
    "open_connection",
]

REASON_HEADER = "x-aioqueue-reason"
QUEUE_HEADER = "x-aioqueue-queue"
DEAD_AT_HEADER = "x-aioqueue-dead-at"
SIZE_HEADER = "x-aioqueue-size"
QUEUE_TYPES = frozenset({"classic", "quorum"})
_PUBLISH_WINDOW = 1000
AMQP_UNKNOWN = {
    "in_flight": "RabbitMQ does not count a queue's unacked messages over AMQP: ask the workers",
    "oldest_held_age": "only the workers know what they hold: ask them",
}
"""What a broker-only count of a RabbitMQ queue cannot tell (``QueueStats.unknown``)."""
WAITING_AGE_UNKNOWN = "RabbitMQ cannot show a waiting message without taking it"


def delay_bucket(delay: float) -> int:
    """TTL in ms of the bucket for a message due in ``delay`` seconds (at least MIN_DELAY): the
    largest that is not longer than the delay, so the message never comes out after its eta."""
    index = bisect.bisect_right(DELAY_BUCKETS_MS, delay * 1000) - 1
    return DELAY_BUCKETS_MS[max(index, 0)]


# -- the broker -------------------------------------------------------------------------


class _Names:
    __slots__ = ("dead", "dlx", "queue")

    def __init__(self, prefix: str, queue: str) -> None:
        self.queue = f"{prefix}.{queue}"
        self.dead = f"{self.queue}.dead"
        self.dlx = f"{prefix}.dead"

    def delay(self, ttl_ms: int) -> str:
        return f"{self.queue}.delay.{ttl_ms}ms"


class AmqpBroker:
    """Task queues on RabbitMQ; see the module docstring for names, amqp_consumer's for delivery.

    With several *quorum* queues consumed by one worker, the prefetch bound applies per queue
    (RabbitMQ has no channel-wide QoS for quorum queues); with classic queues it is channel-wide.
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "aioqueue",
        queue_type: str = "classic",
        delivery_limit: int | None = 20,
        connect_timeout: float = 5.0,
        publish_timeout: float = 30.0,
        heartbeat: float = 60.0,
        reconnect_interval: float = 1.0,
        publisher_confirms: bool = True,
        channel_pool_size: int = 4,
        client_name: str = "aioqueue",
        delete_queues_on_close: bool = False,
        priorities: bool = False,
    ) -> None:
        if queue_type not in QUEUE_TYPES:
            raise ConfigurationError(
                f"amqp_queue_type must be one of {sorted(QUEUE_TYPES)}, not {queue_type!r}"
            )
        self._raw_url = url
        self.url = mask_url(url)
        self.key_prefix = key_prefix
        self.queue_type = queue_type
        self.delivery_limit = delivery_limit
        self.connect_timeout = connect_timeout
        self.publish_timeout = publish_timeout
        self.heartbeat = heartbeat
        self.reconnect_interval = reconnect_interval
        self.publisher_confirms = publisher_confirms
        self.channel_pool_size = channel_pool_size
        self.client_name = client_name
        self.delete_queues_on_close = delete_queues_on_close
        self.priorities = priorities and queue_type == "classic"
        """Work queues honour message priorities (classic queues declared with x-max-priority)."""
        self._priority_refusal = (
            "quorum queues do not order by priority here (RabbitMQ 4.0 has two levels, older "
            "versions none): use amqp_queue_type='classic' for priorities"
            if queue_type != "classic"
            else "amqp_priorities is off (the default: x-max-priority slows RabbitMQ's "
            "deliveries), so the queues have no x-max-priority: set amqp_priorities=True (an "
            "existing queue must then be deleted and declared again, see the README)"
        )
        self._connection: AbstractRobustConnection | None = None
        self._pool: ChannelPool | None = None
        self._admin: AbstractRobustChannel | None = None
        self._prober: Prober | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._declared: dict[str, asyncio.Future[None]] = {}
        self._delays_declared: dict[tuple[str, int], asyncio.Future[None]] = {}
        self._delay_queues: set[str] = set()  # every bucket declared, for delete_queues_on_close
        self._names: dict[str, _Names] = {}

    # -- connections ----------------------------------------------------------------------

    def errors(self) -> contextlib.AbstractContextManager[None]:
        return amqp_errors(self._raw_url)

    def names(self, queue: str) -> _Names:
        names = self._names.get(queue)
        if names is None:
            names = self._names[queue] = _Names(self.key_prefix, queue)
        return names

    def queue_arguments(self, names: _Names) -> dict[str, Any]:
        args: dict[str, Any] = {
            "x-queue-type": self.queue_type,
            "x-dead-letter-exchange": names.dlx,
            "x-dead-letter-routing-key": names.dead,
        }
        if self.queue_type == "quorum" and self.delivery_limit is not None:
            args["x-delivery-limit"] = self.delivery_limit
        if self.priorities:
            args["x-max-priority"] = MAX_PRIORITY
        return args

    def _check_priority(self, body: bytes) -> None:
        """Refuse, before any I/O, a priority these queues would ignore."""
        if not self.priorities and priority_of(body):
            raise ConfigurationError(
                f"cannot send a message with priority {priority_of(body)} to {self.url}: "
                + self._priority_refusal
            )

    def delay_arguments(self, names: _Names, ttl_ms: int) -> dict[str, Any]:
        """A bucket: everything in it expires after ``ttl_ms`` back into the work queue.

        Quorum queues support message TTL and at-least-once dead-lettering since RabbitMQ 3.10
        (which needs ``reject-publish`` overflow; with no length limit nothing is rejected).
        """
        args: dict[str, Any] = {
            "x-queue-type": self.queue_type,
            "x-message-ttl": ttl_ms,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": names.queue,
        }
        if self.queue_type == "quorum":
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
        return args

    async def connect_role(self, role: str) -> AbstractRobustConnection:
        """A new robust connection named for ``role`` (each worker consumes on its own)."""
        return await open_connection(
            self._raw_url,
            name=connection_name(self.client_name, role),
            timeout=self.connect_timeout,
            heartbeat=self.heartbeat,
            reconnect_interval=self.reconnect_interval,
        )

    async def connect(self) -> None:
        if self._connection is not None:
            return
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._connection is None:
                connection = await self.connect_role("client")
                connection.reconnect_callbacks.add(self._on_reconnect)
                self._pool = ChannelPool(
                    connection, self.channel_pool_size, self.publisher_confirms
                )
                self._connection = connection

    def _on_reconnect(self, *_: Any) -> None:
        # A queue deleted while we were away must be declared again before we send to it.
        self._declared.clear()
        self._delays_declared.clear()

    @property
    def connection(self) -> AbstractRobustConnection | None:
        """The client (publishing) connection, for introspection; None before connect()."""
        return self._connection

    async def _admin_channel(self) -> AbstractChannel:
        await self.connect()
        assert self._connection is not None
        if self._admin is None:
            admin = self._connection.channel(publisher_confirms=False)
            await admin.initialize(timeout=self.connect_timeout)
            self._admin = admin
        try:
            return await ready_channel(self._admin, self.connect_timeout)
        except TimeoutError:
            if self._connection.connected.is_set():
                # The connection is back but this channel is not: open another next time.
                stale, self._admin = self._admin, None
                await close_quietly(stale, self.connect_timeout)
            raise

    async def declare(self, queue: str) -> None:
        """Declare ``queue`` with its dead-letter exchange and queue, once per connection."""
        names = self.names(queue)
        await _once(self._declared, queue, lambda: self._declare(self._declare_on, names))

    async def declare_delay(self, queue: str, ttl_ms: int) -> None:
        """Declare the bucket ``ttl_ms`` of ``queue`` (and ``queue`` first: an expired message
        dead-lettered to a missing queue is dropped), once per connection."""
        await self.declare(queue)
        names = self.names(queue)

        async def on(channel: AbstractChannel, names: _Names) -> None:
            bucket = names.delay(ttl_ms)
            self._delay_queues.add(bucket)
            arguments = self.delay_arguments(names, ttl_ms)
            await channel.queue_declare(bucket, durable=True, arguments=arguments)

        await _once(self._delays_declared, (queue, ttl_ms), lambda: self._declare(on, names))

    async def _declare(
        self, on: Callable[[AbstractChannel, _Names], Awaitable[None]], names: _Names
    ) -> None:
        with self.errors():
            channel = await self._admin_channel()
            with guarded(channel):
                await on(channel, names)

    async def _declare_on(self, channel: AbstractChannel, names: _Names) -> None:
        await channel.exchange_declare(names.dlx, exchange_type="direct", durable=True)
        dead_args: dict[str, Any] = {"x-queue-type": self.queue_type}
        await channel.queue_declare(names.dead, durable=True, arguments=dead_args)
        await channel.queue_bind(names.dead, names.dlx, routing_key=names.dead)
        arguments = self.queue_arguments(names)
        try:
            await channel.queue_declare(names.queue, durable=True, arguments=arguments)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise ConfigurationError(self._mismatch(names.queue, arguments, exc)) from exc

    def _mismatch(self, queue: str, arguments: dict[str, Any], exc: BaseException) -> str:
        """What to do when a queue exists with other arguments (RabbitMQ cannot change them)."""
        if "x-max-priority" in str(exc):
            hint = (
                "it was declared with another x-max-priority (by an aioqueue before priorities, "
                "or with amqp_priorities set the other way). Either drain it and delete it "
                f"(rabbitmqctl delete_queue {queue}) so the next start declares it with "
                f"x-max-priority={arguments.get('x-max-priority', 'none')}, or set "
                f"amqp_priorities={'x-max-priority' not in arguments} to match the queue"
            )
        else:
            hint = "drain and delete it, or change the settings back to match it"
        return (
            f"queue {queue!r} at {self.url} exists with other arguments than {arguments!r} "
            f"({exc}): {hint}"
        )

    # -- publishing -----------------------------------------------------------------------

    async def _publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: dict[str, Any] | None = None,
    ) -> None:
        await self.connect()
        assert self._pool is not None
        properties = Basic.Properties(
            delivery_mode=2, headers=headers, priority=priority_of(body) or None
        )
        with self.errors():
            channel = await self._pool.get(self.connect_timeout)
            with guarded(channel):
                try:
                    # wait=False: aiormq holds the channel's lock until the frame is queued, not
                    # until the socket drained it, so concurrent sends pipeline on one channel
                    # (a drain per publish under the lock serialised them). The confirm is
                    # still awaited below. aiormq.Channel takes ``wait`` since 7.1.1; its
                    # abstract base does not declare it.
                    await channel.basic_publish(  # type: ignore[call-arg]
                        body,
                        exchange=exchange,
                        routing_key=routing_key,
                        properties=properties,
                        mandatory=True,
                        timeout=self.publish_timeout,
                        wait=False,
                    )
                except aiormq.exceptions.DeliveryError:
                    # nacked: not queued. The channel may stay broken (see discard): the next
                    # publish gets a new one; this send fails and may be sent again.
                    await self._pool.discard(channel, self.connect_timeout)
                    raise
                except TimeoutError as exc:
                    # aiormq withdraws a publish it had not written yet; one it had written may
                    # or may not be queued: sending again with the same task id is safe.
                    raise BrokerError(
                        f"broker at {self.url} did not confirm a publish within "
                        f"{self.publish_timeout}s (a resource alarm, or a link that stopped "
                        "answering); the message may or may not have been queued"
                    ) from exc

    async def publish(self, queue: str, body: bytes, *, eta: float | None = None) -> None:
        self._check_priority(body)
        if eta is not None and eta - time.time() >= MIN_DELAY:
            await self.publish_delayed(queue, body, eta)
            return
        if queue not in self._declared or not self._declared[queue].done():
            await self.declare(queue)
        try:
            await self._publish("", self.names(queue).queue, body)
        except BrokerError as exc:
            if not isinstance(exc.__cause__, aiormq.exceptions.PublishError):
                raise
            # Returned unroutable: the queue was deleted since we declared it. Declare again
            # and send once more; a second return is a real error.
            self._declared.pop(queue, None)
            await self.declare(queue)
            await self._publish("", self.names(queue).queue, body)

    async def publish_delayed(
        self, queue: str, body: bytes, eta: float, *, attempt: int = 1
    ) -> None:
        """Publish to the bucket for the time left until ``eta``, confirm-awaited.

        ``attempt`` above 1 travels in the attempt header, as :meth:`republish` does. The time
        left must be at least MIN_DELAY (``publish`` sends anything shorter straight on).
        """
        ttl_ms = delay_bucket(eta - time.time())
        headers: dict[str, Any] = {ETA_HEADER: math.ceil(eta * 1000)}
        if attempt > 1:
            headers[ATTEMPT_HEADER] = attempt
        await self.declare_delay(queue, ttl_ms)
        bucket = self.names(queue).delay(ttl_ms)
        try:
            await self._publish("", bucket, body, headers)
        except BrokerError as exc:
            if not isinstance(exc.__cause__, aiormq.exceptions.PublishError):
                raise
            # Returned unroutable: the bucket was deleted since we declared it (as in publish).
            self._declared.pop(queue, None)
            self._delays_declared.pop((queue, ttl_ms), None)
            await self.declare_delay(queue, ttl_ms)
            await self._publish("", bucket, body, headers)

    async def publish_many(self, items: Sequence[Outgoing]) -> None:
        """All in flight at once (in windows of 1,000): confirms overlap instead of queueing."""
        for _, body, _ in items:
            self._check_priority(body)
        for queue in {queue for queue, _, _ in items}:
            await self.declare(queue)
        for start in range(0, len(items), _PUBLISH_WINDOW):
            window = items[start : start + _PUBLISH_WINDOW]
            results = await asyncio.gather(
                *(self.publish(queue, body, eta=eta) for queue, body, eta in window),
                return_exceptions=True,
            )
            failed = next((r for r in results if isinstance(r, BaseException)), None)
            if failed is not None:
                raise failed

    async def republish(
        self, queue: str, body: bytes, attempt: int, eta: float | None = None
    ) -> None:
        """Publish ``body`` to ``queue`` again carrying its attempt number, confirm-awaited.

        With an ``eta`` still ahead (a delayed message given back) it goes to a delay bucket.
        """
        if eta is not None and eta - time.time() >= MIN_DELAY:
            await self.publish_delayed(queue, body, eta, attempt=attempt)
            return
        await self.declare(queue)
        await self._publish("", self.names(queue).queue, body, {ATTEMPT_HEADER: attempt})

    async def bury(self, queue: str, body: bytes, reason: str, *, size: int | None = None) -> None:
        """Publish ``body`` to ``queue``'s dead letters with the reason, confirm-awaited.

        With ``size`` (the body was oversized) only its first bytes are kept, and the size.
        """
        await self.declare(queue)
        names = self.names(queue)
        headers: dict[str, Any] = {
            REASON_HEADER: reason,
            QUEUE_HEADER: queue,
            DEAD_AT_HEADER: time.time(),
        }
        if size is not None:
            headers[SIZE_HEADER] = size
            body = body[:DEAD_LETTER_PREFIX]
        await self._publish(names.dlx, names.dead, body, headers)

    # -- consuming and inspection ---------------------------------------------------------

    def consumer(
        self,
        queues: Sequence[str],
        *,
        worker_id: str,
        prefetch: int | None = None,
        max_size: int | None = None,
    ) -> Consumer:
        """A worker's consumer. ``prefetch`` (the worker's concurrency) sets the unacked limit
        up front; without it the limit starts at the first fetch's slots and grows as needed.
        """
        return _AmqpConsumer(self, queues, worker_id, prefetch, max_size)

    async def queue_length(self, queue: str) -> int:
        await self.connect()
        assert self._connection is not None
        try:
            with self.errors():
                async with (
                    asyncio.timeout(self.connect_timeout),
                    self._connection.channel(publisher_confirms=False) as channel,
                ):
                    underlay = await channel.get_underlay_channel()
                    with guarded(underlay):
                        declared = await underlay.queue_declare(
                            self.names(queue).queue, passive=True
                        )
        except BrokerError as exc:
            if isinstance(exc.__cause__, aiormq.exceptions.ChannelNotFoundEntity):
                return 0
            raise
        return declared.message_count or 0

    async def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """Read without removing: basic.get up to ``limit``, then close the channel.

        Closing a channel returns its unacked messages to their queue in their old order, so
        the dead letters stay where they were whatever happens to this call.
        """
        await self.connect()
        assert self._connection is not None
        out: list[DeadLetter] = []
        try:
            with self.errors():
                async with (
                    asyncio.timeout(self.connect_timeout),
                    self._connection.channel(publisher_confirms=False) as channel,
                ):
                    underlay = await channel.get_underlay_channel()
                    while len(out) < limit:
                        with guarded(underlay):
                            got = await underlay.basic_get(self.names(queue).dead, no_ack=False)
                        if not isinstance(got.delivery, Basic.GetOk):
                            break
                        out.append(_dead_letter(queue, got))
        except BrokerError as exc:
            if isinstance(exc.__cause__, aiormq.exceptions.ChannelNotFoundEntity):
                return []
            raise
        return out

    async def probe_many(self, names: Sequence[str]) -> dict[str, tuple[int, int] | None]:
        """(messages, consumers) of each queue of ``names`` by passive declares; None for one
        that does not exist. All at once on a connection of their own (see
        :mod:`aioqueue.brokers.amqp_probe`), bounded by ``connect_timeout`` as a whole."""
        if self._prober is None:
            self._prober = Prober(lambda: self.connect_role("admin"), self.connect_timeout)
        with self.errors():
            return await self._prober.probe(names)

    def _buckets(self, queue: str) -> list[str]:
        names = self.names(queue)
        return [names.delay(ttl_ms) for ttl_ms in DELAY_BUCKETS_MS]

    async def queue_stats(self, queue: str) -> QueueStats:
        (stats,) = await self.queue_stats_many([queue])
        return stats

    async def queue_stats_many(self, queues: Sequence[str]) -> list[QueueStats]:
        """Counts by passive declares of every queue, its dead letters and its delay buckets,
        all at once (:meth:`probe_many`). RabbitMQ tells neither the unacked count of a queue
        nor its head over AMQP (taking the head to read it would count an attempt), so
        ``in_flight`` and ``oldest_age`` are None here (the workers know what they hold: see
        :func:`aioqueue.operations.queue_stats`)."""
        probes = await self.probe_many(
            [
                name
                for queue in queues
                for name in (self.names(queue).queue, self.names(queue).dead, *self._buckets(queue))
            ]
        )
        out = []
        for queue in queues:
            names = self.names(queue)
            work, dead = probes[names.queue], probes[names.dead]
            buckets = [probes[name] for name in self._buckets(queue)]
            out.append(
                QueueStats(
                    queue=queue,
                    depth=work[0] if work else 0,
                    delayed=sum(bucket[0] for bucket in buckets if bucket),
                    in_flight=None,
                    consumers=work[1] if work else 0,
                    oldest_age=None,
                    dead=dead[0] if dead else 0,
                    unknown={
                        **AMQP_UNKNOWN,
                        **({"oldest_age": WAITING_AGE_UNKNOWN} if work and work[0] else {}),
                    },
                )
            )
        return out

    async def purge(self, queue: str) -> int:
        """queue.purge of the work queue and each of its delay buckets that exists."""
        await self.connect()
        assert self._connection is not None
        probes = await self.probe_many([self.names(queue).queue, *self._buckets(queue)])
        present = [name for name, probe in probes.items() if probe is not None]
        purged = 0
        with self.errors():
            async with (
                asyncio.timeout(self.connect_timeout),
                self._connection.channel(publisher_confirms=False) as channel,
            ):
                underlay = await channel.get_underlay_channel()
                for name in present:
                    with guarded(underlay):
                        done = await underlay.queue_purge(name)
                    purged += done.message_count or 0
        return purged

    async def _settle_dead(self, queue: str, ids: frozenset[str] | None, *, requeue: bool) -> int:
        """Take the dead letters one by one (basic.get); each picked one is sent back (confirmed)
        when ``requeue``, then acked; the channel's close returns the rest in their order."""
        await self.connect()
        assert self._connection is not None
        done = 0
        try:
            with self.errors():
                async with self._connection.channel(publisher_confirms=False) as channel:
                    underlay = await channel.get_underlay_channel()
                    while True:
                        with guarded(underlay):
                            async with asyncio.timeout(self.connect_timeout):
                                got = await underlay.basic_get(self.names(queue).dead)
                        if not isinstance(got.delivery, Basic.GetOk):
                            break
                        if ids is not None and dead_letter_id(got.body) not in ids:
                            continue
                        if requeue:
                            if _dead_letter(queue, got).size is not None:
                                continue  # kept in part only: it cannot run
                            await self.publish(queue, first_attempt(got.body))
                        tag = got.delivery.delivery_tag
                        assert tag is not None  # a GetOk always carries one
                        with guarded(underlay):
                            await underlay.basic_ack(tag)
                        done += 1
        except BrokerError as exc:
            if isinstance(exc.__cause__, aiormq.exceptions.ChannelNotFoundEntity):
                return 0
            raise
        return done

    async def requeue_dead(self, queue: str, ids: frozenset[str] | None) -> int:
        return await self._settle_dead(queue, ids, requeue=True)

    async def drop_dead(self, queue: str, ids: frozenset[str] | None) -> int:
        return await self._settle_dead(queue, ids, requeue=False)

    async def aclose(self) -> None:
        prober, self._prober = self._prober, None
        if prober is not None:
            await prober.aclose()
        connection, self._connection = self._connection, None
        self._pool = None
        self._admin = None
        self._declared.clear()
        self._delays_declared.clear()
        if connection is None:
            return
        try:
            if self.delete_queues_on_close:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.connect_timeout):
                        await self._delete_declared(connection)
        finally:
            await close_quietly(connection, self.connect_timeout)

    async def _delete_declared(self, connection: AbstractRobustConnection) -> None:
        """Delete the queues this broker declared (tests and throwaway environments)."""
        with contextlib.suppress(Exception):
            async with connection.channel(publisher_confirms=False) as channel:
                underlay = await channel.get_underlay_channel()
                for bucket in sorted(self._delay_queues):
                    await underlay.queue_delete(bucket)
                for names in self._names.values():
                    await underlay.queue_delete(names.queue)
                    await underlay.queue_delete(names.dead)
                for dlx in {names.dlx for names in self._names.values()}:
                    await underlay.exchange_delete(dlx)

    def __repr__(self) -> str:
        return (
            f"AmqpBroker({self.url!r}, key_prefix={self.key_prefix!r}, "
            f"queue_type={self.queue_type!r})"
        )


async def _once(
    declared: dict[Any, asyncio.Future[None]], key: Any, declare: Callable[[], Awaitable[None]]
) -> None:
    """Run ``declare`` once for ``key``; concurrent callers wait for it and share its error."""
    done = declared.get(key)
    if done is None:
        done = declared[key] = asyncio.get_running_loop().create_future()
        try:
            await declare()
        except BaseException as exc:
            del declared[key]
            done.set_exception(exc)
            done.exception()  # retrieved here: concurrent waiters re-raise it
            raise
        done.set_result(None)
    await done


def _dead_letter(queue: str, message: DeliveredMessage) -> DeadLetter:
    headers: dict[str, Any] = dict(message.header.properties.headers or {})
    reason = headers.get(REASON_HEADER)
    at = headers.get(DEAD_AT_HEADER)
    if reason is None:
        # Dead-lettered by RabbitMQ itself (delivery limit, rejection, expiry): x-death says why.
        deaths = headers.get("x-death") or [{}]
        death = deaths[0] if isinstance(deaths, list) and deaths else {}
        reason = f"rabbitmq: {_text(death.get('reason', 'unknown'))}"
        when = death.get("time")
        at = when.timestamp() if isinstance(when, datetime) else at
    size = headers.get(SIZE_HEADER)
    return DeadLetter(
        queue=queue,
        body=message.body,
        reason=_text(reason),
        at=float(at) if isinstance(at, int | float) else time.time(),
        size=size if isinstance(size, int) else None,
    )


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
