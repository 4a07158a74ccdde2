"""In-process broker for tests and demos: the Redis broker's behaviour without a server.

It is a product feature (``memory://``), not a stand-in used by our own Redis tests: it keeps the
same contract (FIFO queues, at-most ``max_count`` per fetch, unsettled deliveries returned on
close, dead letters with reasons, delayed messages held back until their eta and then handed out
ahead of the queue, earliest first, priorities taken as on Redis: see :mod:`.priorities`) so a
user's test suite sees what production will do.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence

from ..message import priority_of
from .base import (
    DEAD_LETTER_PREFIX,
    Consumer,
    DeadLetter,
    Delivery,
    Outgoing,
    QueueStats,
    dead_letter_id,
    first_attempt,
    oldest_age,
    wait_for_event,
)
from .priorities import LOW_TURN

_Items = deque[tuple[bytes, int]]

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

    async def resend(self, body: bytes, eta: float | None) -> None:
        """Swap this message for ``body`` (a retry) in one step: nothing can come between."""
        if self in self._consumer.unsettled:
            self._consumer.unsettled.discard(self)
            await self._consumer.broker.publish(self.queue, body, eta=eta)

    async def dead_letter(self, reason: str, *, keep_body: bool = True) -> None:
        if self not in self._consumer.unsettled:
            return
        self._consumer.unsettled.discard(self)
        oversized = self._consumer.max_size is not None and self.size > self._consumer.max_size
        cut = DEAD_LETTER_PREFIX if keep_body else 0
        dead = DeadLetter(
            queue=self.queue,
            body=self.body[:cut] if oversized or not keep_body else self.body,
            reason=reason,
            at=self._consumer.broker.clock(),
            size=self.size if oversized or not keep_body else None,
        )
        self._consumer.broker.dead[self.queue].append(dead)


class _MemoryConsumer:
    max_hold: float | None = None

    def __init__(self, broker: MemoryBroker, queues: Sequence[str], max_size: int | None) -> None:
        self.broker = broker
        self.queues = tuple(queues)
        self.max_size = max_size
        self.unsettled: set[_MemoryDelivery] = set()
        self.turns: dict[str, int] = dict.fromkeys(self.queues, 0)
        """Per queue, messages taken while it held prioritised ones (every LOW_TURN-th goes
        to the lowest level: see .priorities)."""

    async def start(self) -> None:
        self.broker.consumers.add(self)

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
            arrival = self.broker.arrival
            out = self._take(max_count)  # again: a publish from another thread may have come
            if out:  # between the last look and the event (the sync client's loop)
                break
            due_in = max(0.0, self.broker.next_due(self.queues) - self.broker.clock())
            await wait_for_event(arrival, wake, min(remaining, due_in))
            out = self._take(max_count)
        return out

    def _take(self, max_count: int) -> list[Delivery]:
        out: list[Delivery] = []
        self.broker.move_due(self.queues)
        for queue in self.queues:
            items = self.broker.queues[queue]
            urgent = self.broker.urgent.get(queue)
            while len(out) < max_count:
                if urgent and any(urgent.values()):
                    items_now = self._level_to_take(queue, items, urgent)
                elif items:
                    items_now = items
                else:
                    break
                body, attempt = items_now.popleft()
                delivery = _MemoryDelivery(self, queue, body, attempt)
                self.unsettled.add(delivery)
                out.append(delivery)
        return out

    def _level_to_take(self, queue: str, plain: _Items, urgent: dict[int, _Items]) -> _Items:
        """The list the next message comes from: the highest non-empty level, except every
        LOW_TURN-th take, which goes to the lowest (the policy in .priorities)."""
        self.turns[queue] += 1
        levels = [plain] + [urgent[level] for level in sorted(urgent)]
        if self.turns[queue] % LOW_TURN == 0:
            return next(items for items in levels if items)
        return next(items for items in reversed(levels) if items)

    async def close(self) -> None:
        # A delivery still unsettled here was running when the worker gave up on it: it counts
        # as an attempt, exactly as a crash would on Redis.
        for delivery in sorted(self.unsettled, key=id):
            self.broker.push_back(delivery.queue, delivery.body, delivery.attempt + 1)
        self.unsettled.clear()
        self.broker.consumers.discard(self)


class MemoryBroker:
    """Queues in a dict of deques; one per App, shared by its client and in-process workers."""

    def __init__(self, url: str = "memory://", *, clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self.clock = clock
        """Unix time for etas: a test's virtual clock makes delays due when it is advanced."""
        self.queues: defaultdict[str, _Items] = defaultdict(deque)
        """Per queue, the messages without priority (and priority 0), FIFO."""
        self.urgent: dict[str, dict[int, _Items]] = {}
        """Per queue, per priority 1..9, the messages sent with it (created on first use)."""
        self.dead: defaultdict[str, list[DeadLetter]] = defaultdict(list)
        # per queue, a heap of (eta, publish order, body): order breaks ties as sent
        self.delayed: defaultdict[str, list[tuple[float, int, bytes]]] = defaultdict(list)
        self._order = itertools.count()
        self._arrival: asyncio.Event | None = None
        self._arrival_loop: asyncio.AbstractEventLoop | None = None
        self.consumers: set[_MemoryConsumer] = set()
        """Consumers started and not yet closed (for :meth:`queue_stats`)."""

    @property
    def arrival(self) -> asyncio.Event:
        """Set whenever something is published; consumers waiting on it then re-check."""
        if self._arrival is None:
            self._arrival = asyncio.Event()
            self._arrival_loop = asyncio.get_running_loop()
        return self._arrival

    def _notify(self) -> None:
        event = self._arrival
        if event is not None:
            self._arrival = None
            loop = self._arrival_loop
            if loop is None or loop is asyncio.get_running_loop():
                event.set()
            else:  # published from the sync client's loop thread: wake the consumers' loop
                loop.call_soon_threadsafe(event.set)

    def _items(self, queue: str, body: bytes) -> _Items:
        """The list ``body`` belongs in: its queue's, or that of its priority."""
        level = priority_of(body)
        if not level:
            return self.queues[queue]
        return self.urgent.setdefault(queue, {}).setdefault(level, deque())

    def push_back(self, queue: str, body: bytes, attempt: int) -> None:
        self._items(queue, body).appendleft((body, attempt))
        self._notify()

    async def connect(self) -> None:
        return None

    def move_due(self, queues: Sequence[str]) -> None:
        """Due delayed messages go to the front of their queue, earliest eta taken first
        (as on Redis: they already waited their delay, a backlog must not add to it)."""
        now = self.clock()
        for queue in queues:
            heap = self.delayed.get(queue)
            due: list[bytes] = []
            while heap and heap[0][0] <= now:
                due.append(heapq.heappop(heap)[2])
            for body in reversed(due):
                self._items(queue, body).appendleft((body, 1))

    def next_due(self, queues: Sequence[str]) -> float:
        """The earliest eta still waiting in ``queues`` (inf when none)."""
        heads = [heap[0][0] for queue in queues if (heap := self.delayed.get(queue))]
        return min(heads, default=math.inf)

    def _add(self, queue: str, body: bytes, eta: float | None, now: float) -> None:
        if eta is not None and eta > now:
            heapq.heappush(self.delayed[queue], (eta, next(self._order), body))
        else:
            self._items(queue, body).append((body, 1))

    async def publish(self, queue: str, body: bytes, *, eta: float | None = None) -> None:
        self._add(queue, body, eta, self.clock())
        self._notify()

    async def publish_many(self, items: Sequence[Outgoing]) -> None:
        now = self.clock()
        for queue, body, eta in items:
            self._add(queue, body, eta, now)
        self._notify()

    def consumer(
        self, queues: Sequence[str], *, worker_id: str, max_size: int | None = None
    ) -> Consumer:
        return _MemoryConsumer(self, queues, max_size)

    async def queue_length(self, queue: str) -> int:
        """Waiting messages of every priority."""
        urgent = self.urgent.get(queue)
        return len(self.queues[queue]) + (sum(map(len, urgent.values())) if urgent else 0)

    async def delayed_length(self, queue: str) -> int:
        """Messages of ``queue`` waiting for their eta (not counted by :meth:`queue_length`)."""
        return len(self.delayed[queue])

    async def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        return self.dead[queue][:limit]

    async def queue_stats(self, queue: str) -> QueueStats:
        consuming = [c for c in self.consumers if queue in c.queues]
        levels = [self.queues[queue], *self.urgent.get(queue, {}).values()]
        return QueueStats(
            queue=queue,
            depth=await self.queue_length(queue),
            delayed=len(self.delayed[queue]),
            in_flight=sum(1 for c in consuming for d in c.unsettled if d.queue == queue),
            consumers=len(consuming),
            oldest_age=oldest_age((items[0][0] for items in levels if items), time.time()),
            dead=len(self.dead[queue]),
        )

    async def purge(self, queue: str) -> int:
        count = await self.queue_length(queue) + len(self.delayed[queue])
        self.queues.pop(queue, None)
        self.urgent.pop(queue, None)
        self.delayed.pop(queue, None)
        return count

    def _pick_dead(
        self, queue: str, ids: frozenset[str] | None, *, whole: bool = False
    ) -> list[DeadLetter]:
        picked: list[DeadLetter] = []
        kept: list[DeadLetter] = []
        for dead in self.dead[queue]:
            chosen = ids is None or dead_letter_id(dead.body) in ids
            (picked if chosen and not (whole and dead.size is not None) else kept).append(dead)
        self.dead[queue] = kept
        return picked

    async def requeue_dead(self, queue: str, ids: frozenset[str] | None) -> int:
        picked = self._pick_dead(queue, ids, whole=True)
        for dead in picked:
            self._items(queue, dead.body).append((first_attempt(dead.body), 1))
        if picked:
            self._notify()
        return len(picked)

    async def drop_dead(self, queue: str, ids: frozenset[str] | None) -> int:
        return len(self._pick_dead(queue, ids))

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"MemoryBroker({self.url!r})"
