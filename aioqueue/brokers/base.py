"""The broker seam: bytes in, bytes plus an ack handle out.

Brokers never see Python objects, so serialization lives in one place (``message.py``) and a new
transport is a small class. A broker publishes encoded envelopes to named queues and hands a
worker's :class:`Consumer` :class:`Delivery` objects, each of which must end in exactly one of
``ack``, ``requeue`` or ``dead_letter``: the worker's settle step (``worker/settle.py``) turns its
one decision per message into these calls, in order, retried until they succeed or the worker
stops (when the consumer's ``close`` gives back whatever is still unsettled).

Leases are fenced: a delivery's ``ack``, ``requeue`` and ``dead_letter`` act only while this worker
still holds the message. Once the broker has handed it to another worker (this one froze past its
heartbeat, or its connection died), they do nothing, so a late worker can never remove or
overwrite the newer attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import orjson

__all__ = [
    "DEAD_LETTER_PREFIX",
    "Broker",
    "Consumer",
    "DeadLetter",
    "Delivery",
    "Outgoing",
    "QueueAdmin",
    "QueueStats",
    "QueueStatsMany",
    "ReceivesAhead",
    "ResendsAtomically",
    "attempt_of",
    "dead_letter_id",
    "first_attempt",
    "oldest_age",
    "sent_at",
    "take_when_ready",
    "wait_for_event",
]

Outgoing = tuple[str, bytes, float | None]
"""One message to publish: queue, encoded body, eta (unix time, or None for now)."""

DEAD_LETTER_PREFIX = 1024
"""Bytes of an oversized body kept in its dead letter (with its size): enough to see what it was."""

_ATTEMPT_PREFIX = re.compile(rb'^\{"attempt":(\d+),')


def attempt_of(body: bytes) -> int:
    """Attempt number a broker stamped on a redelivered body (1 for a first delivery).

    The Redis broker marks a message it takes back from a dead worker by prefixing the JSON
    envelope with ``"attempt":N``; reading that prefix costs no decode on the hot path.
    """
    if body[:11] != b'{"attempt":':
        return 1
    match = _ATTEMPT_PREFIX.match(body)
    return int(match.group(1)) if match else 1


def first_attempt(body: bytes) -> bytes:
    """``body`` without the attempt a broker stamped on it: sent again, it is a first delivery."""
    if body[:11] != b'{"attempt":':
        return body
    match = _ATTEMPT_PREFIX.match(body)
    return b"{" + body[match.end() :] if match else body


def sent_at(body: bytes) -> float | None:
    """The ``sent_at`` of an envelope (unix time), None when the body has none."""
    at = _envelope_field(body, "sent_at")
    return float(at) if isinstance(at, int | float) and not isinstance(at, bool) and at else None


def _envelope_field(body: bytes, name: str) -> object:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data.get(name) if isinstance(data, dict) else None


def dead_letter_id(body: bytes) -> str | None:
    """The task id of a dead letter's envelope, or None when the body is not one (bad input).

    A dead letter is picked by the id of the task it carries, the id the failure was reported
    under; a body that is not a JSON envelope with a string id can only be picked with ``--all``.
    """
    task_id = _envelope_field(body, "id")
    return task_id if isinstance(task_id, str) else None


def oldest_age(bodies: Iterable[bytes | None], now: float) -> float | None:
    """Seconds since the earliest ``sent_at`` among the head messages ``bodies`` (operator
    commands only: decoding a few heads is fine there, never on the hot path)."""
    sent = [at for body in bodies if body is not None and (at := sent_at(body)) is not None]
    return max(0.0, now - min(sent)) if sent else None


async def take_when_ready(
    take: Callable[[], list[Delivery]],
    arrival: Callable[[], asyncio.Event],
    wake: asyncio.Event | None,
    timeout: float,
) -> list[Delivery]:
    """Call ``take`` each time ``arrival()`` is set until it returns something, ``wake`` is set,
    or ``timeout`` passes: the blocking part of ``fetch`` for consumers that are pushed to."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    out: list[Delivery] = []
    while not out and not (wake is not None and wake.is_set()):
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        await wait_for_event(arrival(), wake, remaining)
        out = take()
    return out


async def wait_for_event(event: asyncio.Event, wake: asyncio.Event | None, timeout: float) -> None:
    """Wait until ``event`` or ``wake`` is set, or ``timeout`` passes (quietly)."""
    if wake is None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await event.wait()
        return
    loop = asyncio.get_running_loop()
    waiters = {loop.create_task(event.wait()), loop.create_task(wake.wait())}
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


@runtime_checkable
class Delivery(Protocol):
    """One message handed to a worker; it owns the message until it settles it."""

    body: bytes
    """The message; for one the broker refused by size, only its first bytes."""
    queue: str
    attempt: int
    """1 for a first delivery; raised each time the message comes back unfinished."""
    size: int
    """Length of the whole message as it was sent (``len(body)`` unless refused by size)."""

    @property
    def redelivered(self) -> bool: ...

    async def ack(self) -> None:
        """The outcome is stored: forget the message."""

    async def requeue(self, *, count_attempt: bool = False) -> None:
        """Give the message back to its queue.

        ``count_attempt=False``: it never ran (shutdown before it started, a delay not yet due),
        so it comes back as it was. ``True``: it ran, or may have, without an outcome, so it
        comes back with its attempt raised and ``max_attempts`` bounds how often that happens.
        """

    async def dead_letter(self, reason: str, *, keep_body: bool = True) -> None:
        """Move the raw message to the queue's dead-letter store with the reason.

        ``keep_body=False`` keeps only the reason and the body's size (a forged message: its
        bytes are the attacker's, not something to replay).
        """


@runtime_checkable
class ResendsAtomically(Protocol):
    """Optional: a delivery that can be swapped for a new message in one atomic step.

    A retry is the same task re-sent with a later eta; done this way, a worker that dies in
    the middle leaves either the old message (which comes back and runs again) or the new one,
    never both (a double run) or neither (a lost task). Without it (AMQP) the settle step
    publishes the retry (confirmed) and then acks, and a redelivered original whose retry is
    already recorded is dropped unrun (see ``worker/handler.py``).
    """

    async def resend(self, body: bytes, eta: float | None) -> None:
        """Replace this message with ``body``, due at ``eta``; fenced like ``ack``."""


class Consumer(Protocol):
    """A worker's handle on its queues."""

    async def start(self) -> None:
        """Register the consumer (heartbeats, subscriptions) before the first fetch."""

    max_hold: float | None
    """Longest a worker may keep a message unsettled without running it (a delay not yet due)
    before it must give it back; None when the broker sets no such limit."""

    async def fetch(
        self, max_count: int, timeout: float, wake: asyncio.Event | None = None
    ) -> list[Delivery]:
        """Up to ``max_count`` deliveries; waits at most ``timeout`` seconds for the first.

        ``timeout=0`` never blocks. The worker only asks for as many as it has free slots,
        so a consumer must never return more than ``max_count``. A set ``wake`` ends the wait
        early (the worker needs its slots back: a parked message fell due).
        """

    async def close(self) -> None:
        """Stop consuming and give every unsettled delivery back to its queue."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be run, kept with the reason so nothing is lost."""

    queue: str
    body: bytes
    """The message, or only its first :data:`DEAD_LETTER_PREFIX` bytes when it was oversized."""
    reason: str
    at: float
    size: int | None = None
    """Length of the whole message when ``body`` holds only its beginning, else None."""


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One queue as an operator sees it (``aioqueue queues``).

    None means "none" (no message waiting, none held) unless the field is named in
    ``unknown``, which says why it cannot be known: RabbitMQ neither counts unacked messages
    per queue over AMQP nor shows a waiting message without taking it (which would count an
    attempt), so there ``in_flight`` and ``oldest_held_age`` come from the workers
    (:func:`aioqueue.operations.queue_stats` asks them) and ``oldest_age`` of a queue with
    messages waiting is unknown.
    """

    queue: str
    depth: int
    """Messages waiting to be taken, every priority."""
    delayed: int
    """Messages waiting for their eta."""
    in_flight: int | None
    """Messages taken by workers and not yet settled (running, waiting for a slot, parked)."""
    consumers: int
    """Workers consuming the queue now (on RabbitMQ: its AMQP consumers)."""
    oldest_age: float | None
    """Seconds since the oldest waiting message was sent (None when none waits)."""
    dead: int
    """Dead letters kept for the queue."""
    oldest_held_age: float | None = None
    """Seconds since the oldest message a worker holds was sent (None when none is held)."""
    unknown: Mapping[str, str] = field(default_factory=dict)
    """Fields that are None because they cannot be known, each with the reason."""

    @property
    def oldest(self) -> float | None:
        """The oldest message of the queue, waiting or held: what ``aioqueue queues`` shows
        (None when there is none, or when a part of it is unknown)."""
        if "oldest_age" in self.unknown or "oldest_held_age" in self.unknown:
            return None
        ages = [age for age in (self.oldest_age, self.oldest_held_age) if age is not None]
        return max(ages) if ages else None


@runtime_checkable
class QueueStatsMany(Protocol):
    """A broker that counts several queues faster together than one after another."""

    async def queue_stats_many(self, queues: Sequence[str]) -> list[QueueStats]: ...


@runtime_checkable
class ReceivesAhead(Protocol):
    """A consumer the broker pushes to: it holds deliveries not handed to the worker yet."""

    def received(self) -> list[Delivery]:
        """Deliveries received and not yet handed out by ``fetch`` (unsettled, so in flight)."""


@runtime_checkable
class QueueAdmin(Protocol):
    """Operating a queue: what the ``queues``, ``purge`` and ``dead-letters`` commands use.

    Dead letters are picked by task id (``ids``; None picks them all). Requeueing sends a dead
    letter back to its queue as a first delivery (same task id, attempt 1), then removes it:
    a crash in between leaves it in both places, never in neither.
    """

    async def queue_stats(self, queue: str) -> QueueStats: ...

    async def purge(self, queue: str) -> int:
        """Delete the messages waiting in ``queue``, delayed ones included (not those being
        run, not dead letters); returns how many."""

    async def requeue_dead(self, queue: str, ids: frozenset[str] | None) -> int:
        """Send the picked dead letters back to ``queue``; returns how many. One kept only in
        part (refused for its size) cannot run and stays where it is."""

    async def drop_dead(self, queue: str, ids: frozenset[str] | None) -> int:
        """Delete the picked dead letters; returns how many."""


class Broker(Protocol):
    """Moves encoded messages between senders and workers."""

    url: str
    """The broker URL with any password masked: safe to log."""

    async def connect(self) -> None: ...

    async def publish(self, queue: str, body: bytes, *, eta: float | None = None) -> None:
        """Publish one message. ``eta`` (unix time): no worker may receive it before then.

        Redis and memory hold a delayed message in a sorted set (a heap) until it is due,
        RabbitMQ in TTL bucket queues. A message that still reaches a worker early (a clock
        ahead of the sender's, a sender that wrote the eta itself) is parked by the worker, not
        run, so an eta is always honoured.
        """

    async def publish_many(self, items: Sequence[Outgoing]) -> None:
        """Publish a batch of ``(queue, body, eta)`` in as few round trips as it allows."""

    def consumer(
        self, queues: Sequence[str], *, worker_id: str, max_size: int | None = None
    ) -> Consumer:
        """A worker's consumer. ``max_size``: bodies longer than this are refused without being
        run (and, where the broker can, without being read whole) and dead-lettered with a
        prefix only."""

    async def queue_length(self, queue: str) -> int:
        """Messages waiting in ``queue`` (not those being processed)."""

    async def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters of ``queue``."""

    async def aclose(self) -> None: ...
