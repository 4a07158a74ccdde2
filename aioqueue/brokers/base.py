"""The broker seam: bytes in, bytes plus an ack handle out.

Brokers never see Python objects, so serialization lives in one place (``message.py``) and a new
transport is a small class. A broker publishes encoded envelopes to named queues and hands a
worker's :class:`Consumer` :class:`Delivery` objects, each of which must end in exactly one of
``ack``, ``requeue`` or ``dead_letter``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["Broker", "Consumer", "DeadLetter", "Delivery", "attempt_of"]

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


@runtime_checkable
class Delivery(Protocol):
    """One message handed to a worker; it owns the message until it settles it."""

    body: bytes
    queue: str
    attempt: int

    @property
    def redelivered(self) -> bool: ...

    async def ack(self) -> None:
        """The outcome is stored: forget the message."""

    async def requeue(self) -> None:
        """Give the message back to its queue untouched (shutdown before it ran)."""

    async def dead_letter(self, reason: str) -> None:
        """Move the raw message to the queue's dead-letter store with the reason."""


class Consumer(Protocol):
    """A worker's handle on its queues."""

    async def start(self) -> None:
        """Register the consumer (heartbeats, subscriptions) before the first fetch."""

    async def fetch(self, max_count: int, timeout: float) -> list[Delivery]:
        """Up to ``max_count`` deliveries; waits at most ``timeout`` seconds for the first.

        ``timeout=0`` never blocks. The worker only asks for as many as it has free slots,
        so a consumer must never return more than ``max_count``.
        """

    async def close(self) -> None:
        """Stop consuming and give every unsettled delivery back to its queue."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be run, kept with the reason so nothing is lost."""

    queue: str
    body: bytes
    reason: str
    at: float


class Broker(Protocol):
    """Moves encoded messages between senders and workers."""

    url: str
    """The broker URL with any password masked: safe to log."""

    async def connect(self) -> None: ...

    async def publish(self, queue: str, body: bytes) -> None: ...

    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Publish a batch in as few round trips as the transport allows."""

    def consumer(self, queues: Sequence[str], *, worker_id: str) -> Consumer: ...

    async def queue_length(self, queue: str) -> int:
        """Messages waiting in ``queue`` (not those being processed)."""

    async def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters of ``queue``."""

    async def aclose(self) -> None: ...
