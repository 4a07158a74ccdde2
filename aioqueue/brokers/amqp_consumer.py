"""AMQP consumer side (RabbitMQ through aio-pika): a worker's consumer and its deliveries.

The broker (names, declaring, publishing, dead letters) is in :mod:`aioqueue.brokers.amqp`; it
makes these through ``AmqpBroker.consumer()``.

Delivery contract: each worker has its own connection (named for it, see
:func:`~aioqueue._amqp.connection_name`) with one consuming channel. ``basic.qos`` bounds the
unacked messages to the worker's slots, so RabbitMQ sends at most as many as the worker has free:
the consumer starts on the first ``fetch`` with a prefetch equal to the slots that fetch asked for
(all of them, since the worker is idle then; ``consumer(prefetch=concurrency)`` sets it up front),
and if the worker later has more free slots than running + buffered allow, it adds a consumer whose
own limit is the difference (per-consumer limits add up). Deliveries wait in a buffer until
``fetch`` hands them out. Only after a reconnect can the buffer briefly hold up to one more prefetch
window while tasks of the dead channel are still finishing.
A message is acked only after the worker stored its outcome. If the connection drops, RabbitMQ
puts every unacked message back; the robust connection reconnects and resumes consuming by
itself, buffered deliveries of the dead channel are discarded, and acks for them are skipped
(their messages come again: at-least-once).

Several queues: RabbitMQ pushes from every queue the worker consumes, round robin among its
consumers, as far as the prefetch limit allows; it has no way to prefer one queue of a channel.
What the worker has received waits in the buffer, and ``fetch`` hands it out in the order of
the worker's queues (``--queues a,b``: a's first), so the first queue is preferred among the
deliveries on hand, not on the server.

Attempts: ``Delivery.attempt`` is the ``x-aioqueue-attempt`` header (1 when absent) plus the
redeliveries RabbitMQ counted since: a quorum queue's ``x-delivery-count``, or 1 for a classic
queue's ``redelivered`` flag. A classic queue does not count past that flag, so a redelivered
message there is first published again with its raised attempt in the header and the original
acked (confirm first, so a crash in between duplicates it rather than losing it); the copy is what
runs. That is what lets ``max_attempts`` stop a message that crashes every worker taking it.
Giving a message back untouched (``requeue(count_attempt=False)``: never ran, or a delay not yet
due) publishes a copy with the same attempt and acks the original, so it does not count; giving
it back after it ran (``count_attempt=True``) is a ``basic.nack`` with requeue, which counts.

A message may stay unacked at most RabbitMQ's ``consumer_timeout`` (30 minutes by default)
before RabbitMQ closes the channel and redelivers everything on it: parked messages (a future
eta) are given back after ``max_hold`` (15 minutes), and a task that runs longer than the
timeout needs the server's ``consumer_timeout`` raised (see the README).

Delays: a message published with an eta waits in a delay bucket (see :mod:`aioqueue.brokers.amqp`)
and comes out into the work queue at most its delay later, usually earlier. One that still has
:data:`MIN_DELAY` or more to wait (its ``x-aioqueue-eta`` header says) is never handed to the
worker: the consumer publishes it to the next bucket (confirmed, then acks it), carrying its
attempt. If that fails it is handed over after all, and the worker parks it (the fallback for
messages with an eta but no header, too). A delayed message given back untouched goes back to a
bucket, not to the work queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
)
from aiormq.abc import AbstractChannel

from .._amqp import close_quietly, guarded, ready_channel
from .base import Delivery, take_when_ready

if TYPE_CHECKING:
    from .amqp import AmqpBroker

__all__ = ["_AmqpConsumer", "_AmqpDelivery"]

# The broker's logger: the split into two modules changes no log record.
log = logging.getLogger("aioqueue.broker.amqp")

_MAX_PREFETCH = 65535
_BURST_SETTLE = 1.0
ATTEMPT_HEADER = "x-aioqueue-attempt"
ETA_HEADER = "x-aioqueue-eta"
"""A delayed message's eta in integer milliseconds (pamqp would send a float as 32 bits, which
is off by minutes at today's unix times): read here without decoding the body."""
DELAY_BUCKETS_MS: tuple[int, ...] = tuple(int(1000 * 2.0**k) for k in range(-5, 17))
"""TTLs of the delay bucket queues: powers of two of seconds, 2^-5 s (31 ms) to 2^16 s."""
MIN_DELAY = DELAY_BUCKETS_MS[0] / 1000
"""A delay shorter than the smallest bucket goes straight to the work queue; the worker waits
out the rest (``ETA_HOLD``), so a message reaches a worker at most this much before its eta."""
MAX_HOLD = 900.0
"""Seconds a parked message may stay unacked: half RabbitMQ's default consumer_timeout."""


class _Acks:
    """The acks of one consuming channel, sent together: one ``multiple`` ack where safe.

    Acks asked for in the same event-loop iteration (the settles a pipelined result store
    finishes together) go out in one flush, in a task of its own: the tags among them below
    every tag still unsettled on the channel are acked by one ``basic.ack(multiple=True)``, the
    rest one by one. A ``multiple`` ack covers every delivery up to its tag, so it is sent only
    when each of those was seen here (tags have no gap) and none is still unsettled: a message
    running, parked, buffered or being given back (its nack queued first) is never covered.
    Flushes run one at a time, in order, so a ``multiple`` ack never overtakes a single one.
    ``ack()`` returns once the frame carrying its tag is queued, as a single ack's would.
    """

    __slots__ = ("_ahead", "_flushing", "_next", "channel", "contiguous", "pending", "unsettled")

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        self.unsettled: set[int] = set()
        self.contiguous = 0  # every tag up to this one was delivered here
        self._ahead: set[int] = set()  # delivered above a tag not seen yet
        self.pending: list[int] = []
        self._next: asyncio.Future[None] | None = None  # done once ``pending`` is queued
        self._flushing = False

    def delivered(self, tag: int) -> None:
        self.unsettled.add(tag)
        if tag != self.contiguous + 1:
            self._ahead.add(tag)
            return
        self.contiguous = tag
        ahead = self._ahead
        while ahead and self.contiguous + 1 in ahead:
            self.contiguous += 1
            ahead.discard(self.contiguous)

    def ack(self, tag: int) -> asyncio.Future[None]:
        self.pending.append(tag)
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            if not self._flushing:
                self._flushing = True
                _background(self._flush())
        return self._next

    async def _flush(self) -> None:
        try:
            while self._next is not None:
                done, self._next = self._next, None
                batch, self.pending = self.pending, []
                try:
                    await self._send(batch)
                finally:
                    if not done.done():
                        done.set_result(None)
        finally:
            self._flushing = False
            if self._next is not None:  # cut short (cancelled): whoever waits is let go
                self._next.set_result(None)
                self._next = None

    async def _send(self, batch: list[int]) -> None:
        unsettled = self.unsettled
        unsettled.difference_update(batch)
        bound = min(min(unsettled, default=self.contiguous + 1), self.contiguous + 1)
        covered = [tag for tag in batch if tag < bound]
        with (
            contextlib.suppress(aiormq.exceptions.ChannelInvalidStateError),
            guarded(self.channel),
        ):
            # basic.ack has no reply; queueing the frame (wait=False) skips a drain per ack.
            if covered:
                await self.channel.basic_ack(max(covered), multiple=len(covered) > 1, wait=False)
            for tag in batch:
                if tag >= bound:
                    await self.channel.basic_ack(tag, wait=False)


_flushes: set[asyncio.Task[None]] = set()


def _background(work: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(work)
    _flushes.add(task)
    task.add_done_callback(_flushes.discard)


class _AmqpDelivery:
    __slots__ = (
        "_acks",
        "_channel",
        "_consumer",
        "_settled",
        "_tag",
        "attempt",
        "body",
        "eta",
        "queue",
        "redelivered_by_broker",
        "size",
    )

    def __init__(
        self, consumer: _AmqpConsumer, queue: str, message: AbstractIncomingMessage
    ) -> None:
        self._consumer = consumer
        self._channel = message.channel
        self._tag = message.delivery_tag or 0
        self._acks = consumer.acks_for(self._channel)
        self._acks.delivered(self._tag)
        self._settled = False
        self.queue = queue
        self.body = message.body
        self.size = len(self.body)
        headers = message.headers
        stamped = headers.get(ATTEMPT_HEADER)
        base = stamped if isinstance(stamped, int) and stamped >= 1 else 1
        count = headers.get("x-delivery-count")
        self.redelivered_by_broker = bool(message.redelivered)
        if isinstance(count, int):
            self.attempt = base + count
        else:
            self.attempt = base + 1 if message.redelivered else base
        eta_ms = headers.get(ETA_HEADER)
        self.eta = eta_ms / 1000 if type(eta_ms) is int else None

    @property
    def waiting(self) -> bool:
        """Came out of a delay bucket with at least MIN_DELAY still to wait."""
        return self.eta is not None and self.eta - time.time() >= MIN_DELAY

    @property
    def redelivered(self) -> bool:
        return self.attempt > 1

    @property
    def stale(self) -> bool:
        """Its channel died: RabbitMQ has already put the message back."""
        return self._channel.is_closed

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        self._consumer.handed.discard(self)
        if self._channel.is_closed:
            log.info("%s: channel gone before settling; RabbitMQ redelivers it", self.queue)
            return False
        return True

    async def ack(self) -> None:
        if self._settle():
            # Sent with the other acks of this loop iteration (see _Acks). A frame lost with
            # its connection means a redelivery: at-least-once either way. Guarded there: with
            # its connection dead, even queueing the frame can wait forever (aioqueue._amqp).
            await asyncio.shield(self._acks.ack(self._tag))

    async def requeue(self, *, count_attempt: bool = False) -> None:
        if self._settled:
            return
        if not count_attempt and not self.stale:
            # A copy with the same attempt, confirmed, then the ack: a nack would set the
            # redelivered flag and count an attempt for a message that never ran.
            broker = self._consumer.broker
            await broker.republish(self.queue, self.body, self.attempt, self.eta)
            await self.ack()
            return
        if self._settle():
            with (
                contextlib.suppress(aiormq.exceptions.ChannelInvalidStateError),
                guarded(self._channel),
            ):
                await self._channel.basic_nack(self._tag, requeue=True)
            # Only now, with the nack queued, may a multiple ack cover its tag.
            self._acks.unsettled.discard(self._tag)

    async def dead_letter(self, reason: str, *, keep_body: bool = True) -> None:
        if self._settled:
            return
        # Published and confirmed before the ack: a crash in between keeps the message (it
        # comes again and is dead-lettered again), never loses it.
        max_size = self._consumer.max_size
        size = self.size if max_size is not None and self.size > max_size else None
        if not keep_body:
            await self._consumer.broker.bury(self.queue, b"", reason, size=self.size)
        else:
            await self._consumer.broker.bury(self.queue, self.body, reason, size=size)
        await self.ack()


class _AmqpConsumer:
    """One worker's connection, channel and consumers; deliveries wait in a bounded buffer."""

    max_hold: float | None = MAX_HOLD

    def __init__(
        self,
        broker: AmqpBroker,
        queues: Sequence[str],
        worker_id: str,
        prefetch: int | None,
        max_size: int | None = None,
    ) -> None:
        self.broker = broker
        self.max_size = max_size
        self._recounting: set[asyncio.Task[None]] = set()
        self._rerouting: set[asyncio.Task[None]] = set()
        self._initial_prefetch = prefetch or 0
        self.worker_id = worker_id
        self.queues = tuple(queues)
        self._rank = {queue: index for index, queue in enumerate(self.queues)}
        self.handed: set[_AmqpDelivery] = set()
        self._buffer: list[_AmqpDelivery] = []
        self._arrived = asyncio.Event()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._amqp_queues: dict[str, AbstractRobustQueue] = {}
        self._tags: dict[str, list[str]] = {}
        self._prefetch = 0
        self._reopens = 0  # channel reopens seen by the robust connection ...
        self._rebuilt = 0  # ... and the number the consumers were last rebuilt for
        # A channel-wide limit covers several classic queues at once; quorum queues refuse
        # global QoS, so there the limit is per queue (documented on AmqpBroker).
        self._global_qos = len(self.queues) > 1 and broker.queue_type == "classic"
        self._acks: _Acks | None = None

    def acks_for(self, channel: AbstractChannel) -> _Acks:
        """The ack batcher of ``channel`` (a new one when the robust channel reopened)."""
        acks = self._acks
        if acks is None or acks.channel is not channel:
            acks = self._acks = _Acks(channel)
        return acks

    @property
    def channel(self) -> AbstractRobustChannel:
        assert self._channel is not None, "start() the consumer first"
        return self._channel

    async def start(self) -> None:
        broker = self.broker
        for queue in self.queues:
            await broker.declare(queue)
        self._connection = await broker.connect_role(f"worker:{self.worker_id}")
        with broker.errors():
            self._channel = self._connection.channel(publisher_confirms=False)
            await self._channel.initialize(timeout=broker.connect_timeout)
            self._channel.reopen_callbacks.add(self._on_reopen)
            for queue in self.queues:
                names = broker.names(queue)
                self._amqp_queues[queue] = await self._channel.declare_queue(
                    names.queue, durable=True, arguments=broker.queue_arguments(names)
                )

    async def fetch(
        self, max_count: int, timeout: float, wake: asyncio.Event | None = None
    ) -> list[Delivery]:
        await self._ensure_prefetch(max(self._initial_prefetch, len(self.handed) + max_count))
        out = self._take(max_count)
        if out:
            return out
        if timeout <= 0:
            return await self._fetch_ready(max_count)
        return await take_when_ready(
            lambda: self._take(max_count), lambda: self._arrived, wake, timeout
        )

    def received(self) -> list[Delivery]:
        """Pushed by RabbitMQ, not handed to the worker yet: unacked, so in flight."""
        return [d for d in self._buffer if not d.stale]

    def _take(self, max_count: int) -> list[Delivery]:
        if any(d.stale for d in self._buffer):
            self._buffer = [d for d in self._buffer if not d.stale]
        if len(self._rank) > 1 and len(self._buffer) > max_count:
            rank = self._rank
            self._buffer.sort(key=lambda d: rank[d.queue])  # stable: arrival order per queue
        taken, self._buffer = self._buffer[:max_count], self._buffer[max_count:]
        if not self._buffer:
            self._arrived.clear()
        self.handed.update(taken)
        return list(taken)

    async def _fetch_ready(self, max_count: int) -> list[Delivery]:
        """``timeout=0``: what is ready now. Deliveries are pushed, so ask the queues first.

        The count comes from a short-lived channel on the client connection: a passive declare
        of a missing queue closes its channel, and that must not be the consuming one.
        """
        ready = 0
        for queue in self.queues:
            ready += await self.broker.queue_length(queue)
        if ready == 0:
            return self._take(max_count)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_BURST_SETTLE):
                await self._arrived.wait()
        return self._take(max_count)

    async def _ensure_prefetch(self, needed: int) -> None:
        """Start consuming, or raise the limit when the worker has more free slots than it.

        RabbitMQ applies a per-consumer limit to consumers started after it, and counts each
        consumer's unacked messages on their own. So the limit grows by adding one consumer per
        queue whose own limit is the difference: the sum stays exactly the worker's slots. A
        channel-wide (global) limit simply changes. After a reconnect the robust channel starts
        every consumer again with the last limit set, so the next fetch rebuilds them as one.
        """
        needed = min(needed, _MAX_PREFETCH)
        if self._reopens != self._rebuilt and self._prefetch:
            await self._rebuild_consumers()
        if needed <= self._prefetch:
            return
        delta = needed - self._prefetch
        added = False
        try:
            async with self._controlling():
                if self._global_qos:
                    await self.channel.set_qos(prefetch_count=needed, global_=True)
                    if self._tags:
                        self._prefetch = needed
                        return
                else:
                    await self.channel.set_qos(prefetch_count=delta)
                for queue, amqp_queue in self._amqp_queues.items():
                    tag = await amqp_queue.consume(self._callback(queue))
                    self._tags.setdefault(queue, []).append(tag)
                    added = True
        except BaseException:
            if added:
                # Half done: some queues have the new consumer, some not. Rebuilding makes
                # it one consumer per queue with the whole limit.
                self._prefetch = needed
                self._reopens += 1
            raise
        self._prefetch = needed

    @contextlib.asynccontextmanager
    async def _controlling(self) -> AsyncIterator[None]:
        """Consumer and QoS changes: on the live channel, bounded in time, failing (instead of
        hanging) if the channel dies under them."""
        broker = self.broker
        with broker.errors():
            async with asyncio.timeout(broker.connect_timeout):
                underlay = await ready_channel(self.channel, broker.connect_timeout)
                with guarded(underlay):
                    yield

    async def _rebuild_consumers(self) -> None:
        """After a reconnect: one consumer per queue again, with the whole limit."""
        reopens = self._reopens
        async with self._controlling():
            if self._global_qos:
                await self.channel.set_qos(prefetch_count=self._prefetch, global_=True)
            else:
                for queue, tags in self._tags.items():
                    while tags:
                        await self._amqp_queues[queue].cancel(tags[-1])
                        tags.pop()
                await self.channel.set_qos(prefetch_count=self._prefetch)
            for queue, amqp_queue in self._amqp_queues.items():
                if not self._tags.get(queue):
                    self._tags[queue] = [await amqp_queue.consume(self._callback(queue))]
        self._rebuilt = reopens

    async def _recount(self, delivery: _AmqpDelivery) -> None:
        """Classic queue, redelivered: publish a copy carrying the raised attempt, ack this one.

        If that fails the original stays unacked, and RabbitMQ gives it back when the channel
        closes: counted late, never lost.
        """
        try:
            await self.broker.republish(delivery.queue, delivery.body, delivery.attempt)
            await delivery.ack()
        except Exception as exc:
            log.warning("could not record a redelivery on %s: %s", delivery.queue, exc)

    async def _reroute(self, delivery: _AmqpDelivery) -> None:
        """Out of a bucket early: on to the bucket for the time left, confirmed, then the ack.

        If that fails the worker gets it after all and parks it until its eta: late to be
        freed, never early, never lost.
        """
        assert delivery.eta is not None
        try:
            await self.broker.publish_delayed(
                delivery.queue, delivery.body, delivery.eta, attempt=delivery.attempt
            )
        except Exception as exc:
            log.warning("could not re-route a delayed message on %s: %s", delivery.queue, exc)
            if not delivery.stale:
                self._buffer.append(delivery)
                self._arrived.set()
            return
        await delivery.ack()

    def _spawn(self, tasks: set[asyncio.Task[None]], work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _on_reopen(self, *_: Any) -> None:
        self._reopens += 1

    def _callback(self, queue: str) -> Callable[[AbstractIncomingMessage], Any]:
        count_redeliveries = self.broker.queue_type == "classic"

        async def on_message(message: AbstractIncomingMessage) -> None:
            delivery = _AmqpDelivery(self, queue, message)
            if delivery.eta is not None and delivery.waiting:
                # Also records a classic redelivery: the copy carries the raised attempt.
                self._spawn(self._rerouting, self._reroute(delivery))
                return
            if count_redeliveries and delivery.redelivered_by_broker:
                self._spawn(self._recounting, self._recount(delivery))
                return
            self._buffer.append(delivery)
            self._arrived.set()

        return on_message

    async def close(self) -> None:
        """Cancel the consumers, give back everything unsettled, close the connection.

        Bounded in time: with RabbitMQ away there is nothing to give back (it requeued the
        unacked messages when the connection died), and waiting for it would hold up the
        worker's shutdown.
        """
        if self._connection is None:
            return
        connection, self._connection = self._connection, None
        timeout = self.broker.connect_timeout
        try:
            if connection.connected.is_set():
                async with asyncio.timeout(timeout):
                    await self._give_back()
        except Exception as exc:
            log.info("giving back unsettled deliveries failed (%r); RabbitMQ requeues them", exc)
        finally:
            for task in list(self._rerouting):
                task.cancel()  # cut short by the timeout: the channel gives its message back
            self._buffer.clear()
            await close_quietly(connection, timeout)

    async def _give_back(self) -> None:
        channel = self._channel
        if channel is None or channel.is_closed:
            return
        with contextlib.suppress(Exception):
            async with self._controlling():
                for queue, tags in self._tags.items():
                    for tag in tags:
                        await self._amqp_queues[queue].cancel(tag)
        for task in list(self._recounting):
            task.cancel()  # its message is still unacked: closing the channel returns it
        if self._rerouting:
            # Let them finish (bounded by close's timeout): one cut short may leave a copy in
            # a bucket beside the original the channel gives back.
            await asyncio.gather(*self._rerouting, return_exceptions=True)
        never_ran = [d for d in self._buffer if not d.stale]
        ran = [d for d in self.handed if not d.stale]
        self._buffer.clear()
        for delivery in never_ran:
            await delivery.requeue(count_attempt=False)
        for delivery in sorted(ran, key=lambda d: d._tag):
            await delivery.requeue(count_attempt=True)
        # Closing waits for close-ok: the requeues above are done before anyone looks again.
        await close_quietly(channel, self.broker.connect_timeout)
