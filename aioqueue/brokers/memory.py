"""In-process broker for tests and demos: the Redis broker's behaviour without a server.

It is a product feature (``memory://``), not a stand-in used by our own Redis tests: it keeps the
same contract (FIFO queues, at-most ``max_count`` per fetch, unsettled deliveries returned on
close, dead letters with reasons, delayed messages held back until their eta and then handed out
ahead of the queue, earliest first) so a user's test suite sees what production will do.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections import defaultdict, deque
from collections.abc import Sequence

from .base import DEAD_LETTER_PREFIX, Consumer, DeadLetter, Delivery, Outgoing, wait_for_event

__all__ = ["MemoryBroker"]


class _MemoryDelivery:
    __slots__ = ("_consumer", "attempt", "body", "queue", "size")

    def __init__(self, consumer: _MemoryConsumer, queue: str, body: bytes, attempt: int) -> None:
        self._consumer = consumer
        self.queue = queue
        self.body = body
        self.attempt = attempt
        self.size = len(body)

    @property
    def redelivered(self) -> bool:
        return self.attempt > 1

    async def ack(self) -> None:
        self._consumer.unsettled.discard(self)

    async def requeue(self, *, count_attempt: bool = False) -> None:
        if self in self._consumer.unsettled:
            self._consumer.unsettled.discard(self)
            attempt = self.attempt + 1 if count_attempt else self.attempt
            self._consumer.broker.push_back(self.queue, self.body, attempt)

    async def dead_letter(self, reason: str) -> None:
        if self not in self._consumer.unsettled:
            return
        self._consumer.unsettled.discard(self)
        oversized = self._consumer.max_size is not None and self.size > self._consumer.max_size
        dead = DeadLetter(
            queue=self.queue,
            body=self.body[:DEAD_LETTER_PREFIX] if oversized else self.body,
            reason=reason,
            at=time.time(),
            size=self.size if oversized else None,
        )
        self._consumer.broker.dead[self.queue].append(dead)


class _MemoryConsumer:
    max_hold: float | None = None

    def __init__(self, broker: MemoryBroker, queues: Sequence[str], max_size: int | None) -> None:
        self.broker = broker
        self.queues = tuple(queues)
        self.max_size = max_size
        self.unsettled: set[_MemoryDelivery] = set()

    async def start(self) -> None:
        return None

    async def fetch(
        self, max_count: int, timeout: float, wake: asyncio.Event | None = None
    ) -> list[Delivery]:
        out = self._take(max_count)
        if out or timeout <= 0:
            return out
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not out and not (wake is not None and wake.is_set()):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            # wake at the next due time too; the broker replaces its arrival event after each
            # notify, so look it up each time
            due_in = max(0.0, self.broker.next_due(self.queues) - time.time())
            await wait_for_event(self.broker.arrival, wake, min(remaining, due_in))
            out = self._take(max_count)
        return out

    def _take(self, max_count: int) -> list[Delivery]:
        out: list[Delivery] = []
        self.broker.move_due(self.queues)
        for queue in self.queues:
            items = self.broker.queues[queue]
            while items and len(out) < max_count:
                body, attempt = items.popleft()
                delivery = _MemoryDelivery(self, queue, body, attempt)
                self.unsettled.add(delivery)
                out.append(delivery)
        return out

    async def close(self) -> None:
        # A delivery still unsettled here was running when the worker gave up on it: it counts
        # as an attempt, exactly as a crash would on Redis.
        for delivery in sorted(self.unsettled, key=id):
            self.broker.push_back(delivery.queue, delivery.body, delivery.attempt + 1)
        self.unsettled.clear()


class MemoryBroker:
    """Queues in a dict of deques; one per App, shared by its client and in-process workers."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self.queues: defaultdict[str, deque[tuple[bytes, int]]] = defaultdict(deque)
        self.dead: defaultdict[str, list[DeadLetter]] = defaultdict(list)
        # per queue, a heap of (eta, publish order, body): order breaks ties as sent
        self.delayed: defaultdict[str, list[tuple[float, int, bytes]]] = defaultdict(list)
        self._order = itertools.count()
        self._arrival: asyncio.Event | None = None

    @property
    def arrival(self) -> asyncio.Event:
        """Set whenever something is published; consumers waiting on it then re-check."""
        if self._arrival is None:
            self._arrival = asyncio.Event()
        return self._arrival

    def _notify(self) -> None:
        if self._arrival is not None:
            self._arrival.set()
            self._arrival = None

    def push_back(self, queue: str, body: bytes, attempt: int) -> None:
        self.queues[queue].appendleft((body, attempt))
        self._notify()

    async def connect(self) -> None:
        return None

    def move_due(self, queues: Sequence[str]) -> None:
        """Due delayed messages go to the front of their queue, earliest eta taken first
        (as on Redis: they already waited their delay, a backlog must not add to it)."""
        now = time.time()
        for queue in queues:
            heap = self.delayed.get(queue)
            due: list[tuple[bytes, int]] = []
            while heap and heap[0][0] <= now:
                due.append((heapq.heappop(heap)[2], 1))
            if due:
                self.queues[queue].extendleft(reversed(due))

    def next_due(self, queues: Sequence[str]) -> float:
        """The earliest eta still waiting in ``queues`` (inf when none)."""
        heads = [heap[0][0] for queue in queues if (heap := self.delayed.get(queue))]
        return min(heads, default=math.inf)

    def _add(self, queue: str, body: bytes, eta: float | None, now: float) -> None:
        if eta is not None and eta > now:
            heapq.heappush(self.delayed[queue], (eta, next(self._order), body))
        else:
            self.queues[queue].append((body, 1))

    async def publish(self, queue: str, body: bytes, *, eta: float | None = None) -> None:
        self._add(queue, body, eta, time.time())
        self._notify()

    async def publish_many(self, items: Sequence[Outgoing]) -> None:
        now = time.time()
        for queue, body, eta in items:
            self._add(queue, body, eta, now)
        self._notify()

    def consumer(
        self, queues: Sequence[str], *, worker_id: str, max_size: int | None = None
    ) -> Consumer:
        return _MemoryConsumer(self, queues, max_size)

    async def queue_length(self, queue: str) -> int:
        return len(self.queues[queue])

    async def delayed_length(self, queue: str) -> int:
        """Messages of ``queue`` waiting for their eta (not counted by :meth:`queue_length`)."""
        return len(self.delayed[queue])

    async def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        return self.dead[queue][:limit]

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"MemoryBroker({self.url!r})"
