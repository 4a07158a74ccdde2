"""Running an app's tasks inside a test: memory transport, a virtual clock, a worker you drain.

The pieces behind the pytest plugin (:mod:`aioqueue.testing`), usable without pytest::

    clock = VirtualClock()
    with on_memory(app, clock) as harness:
        await add.options(countdown=60).send(2, 3)
        clock.advance(60)
        assert await harness.worker.drain() == 1

Nothing here is eager mode: a message is encoded, published to a memory broker, decoded and run
by the worker's own handler and settled as a worker settles it, so a task that would fail on a
real worker (unknown name, arguments that do not bind, a result that cannot be encoded) fails the
same way here. Time is injected, not patched: the app, its memory broker, the handler and the
retry planner read the app's clock, which the harness points at a :class:`VirtualClock`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .backends.memory import MemoryBackend
from .brokers.base import Outgoing
from .brokers.memory import MemoryBroker
from .errors import AioQueueError, ConfigurationError
from .message import Message
from .periodic.claims import MemoryClaims
from .periodic.scheduler import Scheduler
from .worker.executors import Runner
from .worker.handler import Handler, Park
from .worker.revocations import Revocations
from .worker.settle import Settler

if TYPE_CHECKING:
    from ._control_bus import Listening
    from .app import App
    from .task import Task

__all__ = ["InProcessWorker", "RecordingBroker", "SentMessages", "VirtualClock", "on_memory"]

DRAIN_LIMIT = 10_000
"""Messages one ``drain()`` runs at most: more means a task keeps sending (itself, say)."""


class VirtualClock:
    """Unix time that moves only when told: ``advance(3600)`` and an hour has passed.

    It starts at today's midnight UTC unless told otherwise, so interval schedules (aligned to
    the Unix clock) tick at the same offsets in every run: ``every=600`` first at +600 s.
    """

    def __init__(self, start: float | None = None) -> None:
        if start is None:
            start = time.time() // 86400 * 86400
        self._now = float(start)

    def time(self) -> float:
        return self._now

    __call__ = time

    def now(self) -> datetime:
        """The virtual time as an aware UTC datetime (for ``eta=`` and ``expires=``)."""
        return datetime.fromtimestamp(self._now, UTC)

    def set(self, at: float) -> None:
        """Put the clock at ``at`` (the in-process worker does, replaying an advance)."""
        self._now = float(at)

    def advance(self, seconds: float) -> None:
        """Move the clock forward; due messages then run at the next ``drain()``."""
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not math.isfinite(seconds)
            or seconds < 0
        ):
            raise ConfigurationError(
                f"advance takes a finite number of seconds, at least 0 (the clock does not "
                f"go back), not {seconds!r}"
            )
        self._now += seconds

    def __repr__(self) -> str:
        return f"<VirtualClock {self.now().isoformat()}>"


@dataclass(frozen=True, slots=True)
class Sent:
    """One published message, as the worker will decode it."""

    queue: str
    message: Message
    eta: float | None


class RecordingBroker(MemoryBroker):
    """A memory broker that keeps every message published through it, decoded."""

    def __init__(self, app: App, clock: VirtualClock) -> None:
        super().__init__("memory://", clock=clock.time)
        self._decode = app.codec.decode
        self.published: list[Sent] = []

    async def publish(self, queue: str, body: bytes, *, eta: float | None = None) -> None:
        self.published.append(Sent(queue, self._decode(body), eta))
        await super().publish(queue, body, eta=eta)

    async def publish_many(self, items: Sequence[Outgoing]) -> None:
        self.published.extend(Sent(queue, self._decode(body), eta) for queue, body, eta in items)
        await super().publish_many(items)


_ANY: Any = object()


def _eta_of(decode: Callable[[bytes], Message], body: bytes) -> float | None:
    """A message's eta, or None when it cannot be decoded (the handler then rejects it)."""
    try:
        return decode(body).eta
    except AioQueueError:
        return None


class SentMessages:
    """What the code under test sent: ``sent("proj.add", args=(2, 3))`` lists the matches.

    Retries the worker sent are left out unless ``retries=True``.
    """

    def __init__(self, broker: RecordingBroker) -> None:
        self._broker = broker

    def __call__(
        self,
        task: str | Task[Any, Any] | None = None,
        *,
        args: Any = _ANY,
        kwargs: Any = _ANY,
        queue: str | None = None,
        retries: bool = False,
    ) -> list[Message]:
        name = task if task is None or isinstance(task, str) else task.name
        found = []
        for sent in self._broker.published:
            message = sent.message
            if name is not None and message.task != name:
                continue
            if args is not _ANY and tuple(message.args) != tuple(args):
                continue
            if kwargs is not _ANY and message.kwargs != kwargs:
                continue
            if queue is not None and sent.queue != queue:
                continue
            if message.retries and not retries:
                continue
            found.append(message)
        return found

    def assert_sent(
        self,
        task: str | Task[Any, Any],
        *,
        args: Any = _ANY,
        kwargs: Any = _ANY,
        queue: str | None = None,
        times: int | None = None,
    ) -> list[Message]:
        """The matching messages; AssertionError listing what was sent if none (or not
        ``times`` of them) match."""
        found = self(task, args=args, kwargs=kwargs, queue=queue)
        if (times is None and not found) or (times is not None and len(found) != times):
            name = task if isinstance(task, str) else task.name
            wanted = f"{name}" + ("" if args is _ANY else f" args={tuple(args)!r}")
            wanted += "" if kwargs is _ANY else f" kwargs={kwargs!r}"
            listing = "\n".join(
                f"  {s.message.task} args={tuple(s.message.args)!r} kwargs={s.message.kwargs!r}"
                f" queue={s.queue!r}" + (f" retry {s.message.retries}" if s.message.retries else "")
                for s in self._broker.published
            )
            count = "at least once" if times is None else f"{times} time(s)"
            raise AssertionError(
                f"expected {wanted} sent {count}, found {len(found)}; sent:\n{listing or '  none'}"
            )
        return found

    def assert_not_sent(self, task: str | Task[Any, Any]) -> None:
        self.assert_sent(task, times=0)

    def __len__(self) -> int:
        return len(self(None))


class InProcessWorker:
    """The worker's handler and settle step over the memory broker, run when you ``drain()``.

    Time is replayed, not skipped: after ``clock.advance(3600)`` the next run visits each moment
    something was due in that hour (a delayed message's eta, a periodic tick) in order, with the
    clock set to it, so a retry sent at minute 1 with a 10 s backoff runs at 1:10 and its own
    retry is planned from there, and a tick's ``expires`` is judged at its own time.
    """

    def __init__(
        self, app: App, broker: RecordingBroker, backend: MemoryBackend, clock: VirtualClock
    ) -> None:
        self.app = app
        self.broker = broker
        self.backend = backend
        self.clock = clock
        self.processed = 0
        """Messages run (or rejected) so far."""
        self._revocations = Revocations(lambda task_id: None)  # nothing runs between drains
        self._listening: Listening | None = None
        self._handler: Handler | None = None
        self._settler = Settler(backend, None, broker)
        self._scheduler: Scheduler | None = None
        self._walked = clock.time()
        """The virtual time up to which every due thing has been run."""

    def _queues(self) -> list[str]:
        broker = self.broker
        return sorted({*broker.queues, *broker.urgent, *broker.delayed})

    async def _start(self) -> Handler:
        if self._handler is not None:
            return self._handler
        self._listening = await self.app.control.listen(self._revocations.add)
        if self.app.periodic_entries():  # the app's schedule, from the moment the test began
            self._scheduler = Scheduler(
                self.app, claims=MemoryClaims(self.broker), owner="aioqueue.testing"
            )
            await self._scheduler.start_at(self._walked)
        runner = Runner(self.app, threads=None, processes=0)  # process tasks run on a thread
        self._handler = Handler(
            self.app,
            runner,
            self.backend,
            max_hold=None,
            worker_id="aioqueue.testing",
            revocations=self._revocations,
        )
        return self._handler

    def _next_event(self) -> float:
        """The earliest eta waiting or periodic tick planned (inf when none)."""
        wake = self._scheduler.next_wake() if self._scheduler is not None else None
        eta = self.broker.next_due(self._queues())
        return eta if wake is None else min(wake, eta)

    async def run_due(self) -> int:
        """Run what is due by the clock, replaying the time since the last run in order
        (etas, retries and periodic ticks at their own moments); the clock is not moved
        past where the test put it. Returns how many messages ran."""
        handler = await self._start()
        target = self.clock.time()
        ran = 0
        if target > self._walked:  # what was queued before the advance runs at its start
            self.clock.set(self._walked)
            ran += await self._run_now(handler)
        steps = 0
        while (at := self._next_event()) <= target:
            steps += 1
            self._check_limit(ran, steps)
            self._move_to(max(at, self._walked))
            ran += await self._run_now(handler)
        self._move_to(target)
        return ran + await self._run_now(handler)

    async def drain(self) -> int:
        """Run everything sent, until no message is queued or delayed: the clock moves on to
        each eta in turn (retries with their backoff, countdowns), and periodic ticks due on
        the way are sent and run. Returns how many messages ran. ``run_due()`` runs only
        what is due without moving the clock."""
        ran = await self.run_due()
        steps = 0
        while math.isfinite(at := self.broker.next_due(self._queues())):
            steps += 1
            self._check_limit(ran, steps)
            if at > self.clock.time():
                self.clock.advance(at - self.clock.time())
            ran += await self.run_due()
        return ran

    def drain_sync(self) -> int:
        """:meth:`drain` from a sync test (code that sends with ``send_sync``): it runs on the
        app's sync client loop, where those sends went."""
        from .sync import run_sync

        return run_sync(self.app, "aioqueue_worker.drain_sync()", self.drain)

    def _move_to(self, at: float) -> None:
        self.clock.set(at)
        self._walked = at

    def _check_limit(self, ran: int, steps: int) -> None:
        if ran >= DRAIN_LIMIT or steps >= DRAIN_LIMIT:
            raise AioQueueError(
                f"drain ran {ran} messages over {steps} moments and more keep coming: does a "
                "task send itself without end, or a periodic entry tick faster than its task "
                "runs?"
            )

    async def _run_now(self, handler: Handler) -> int:
        """Tick the schedule, then run every message due now, and what those send that is due
        now too."""
        if self._scheduler is not None:
            await self._scheduler.step(self.clock.time())
        ran = 0
        decode = self.app.codec.decode
        while True:
            consumer = self.broker.consumer(
                self._queues(), worker_id="aioqueue.testing", max_size=self.app.codec.max_size
            )
            deliveries = await consumer.fetch(1, 0)
            if not deliveries:
                return ran
            self._check_limit(ran, 0)
            delivery = deliveries[0]
            eta = _eta_of(decode, delivery.body)
            if eta is not None and eta > self.clock.time():
                # sent after an advance() at a later time than this replay step: back to the
                # delayed set until the replay reaches it (a real worker would park it)
                await MemoryBroker.publish(self.broker, delivery.queue, delivery.body, eta=eta)
                await delivery.ack()
                continue
            decision = await handler.decide(delivery)
            if isinstance(decision, Park):  # not due by the handler's clock: keep it delayed
                await MemoryBroker.publish(
                    self.broker, delivery.queue, delivery.body, eta=decision.until
                )
                await delivery.ack()
                continue
            await self._settler.settle(delivery, decision)
            ran += 1
            self.processed += 1

    @property
    def delayed(self) -> int:
        """Messages waiting for their eta (``clock.advance()`` makes them due)."""
        return sum(len(heap) for heap in self.broker.delayed.values())

    @property
    def queued(self) -> int:
        """Messages due now, not yet run."""
        urgent = sum(
            len(items) for levels in self.broker.urgent.values() for items in levels.values()
        )
        return sum(len(items) for items in self.broker.queues.values()) + urgent

    def dead_letters(self, queue: str | None = None) -> list[Any]:
        """Messages the worker refused (bad input, retries used up), with their reasons."""
        queues = [queue] if queue is not None else sorted(self.broker.dead)
        return [dead for name in queues for dead in self.broker.dead[name]]


@dataclass(slots=True)
class Harness:
    """What :func:`on_memory` gives: the clock, the worker, and the record of sends."""

    app: App
    clock: VirtualClock
    broker: RecordingBroker
    backend: MemoryBackend
    worker: InProcessWorker
    sent: SentMessages


_SWAPPED = (
    "_broker",
    "_backend",
    "_own_broker",
    "_own_backend",
    "_broker_ready",
    "_backend_ready",
    "_control",
    "_connect_lock",
    "clock",
)


@contextlib.contextmanager
def on_memory(app: App, clock: VirtualClock | None = None) -> Iterator[Harness]:
    """Run ``app`` (its own task registry) on a fresh memory transport and ``clock`` inside the
    block; its own broker, backend and clock come back after it (they are not closed)."""
    clock = clock or VirtualClock()
    saved = {name: getattr(app, name) for name in _SWAPPED}
    broker = RecordingBroker(app, clock)
    backend = MemoryBackend()
    app._broker, app._backend = broker, backend
    app._own_broker = app._own_backend = False
    app._broker_ready = app._backend_ready = False
    app._control = None
    app._connect_lock = None
    app.clock = clock.time
    try:
        yield Harness(
            app,
            clock,
            broker,
            backend,
            InProcessWorker(app, broker, backend, clock),
            SentMessages(broker),
        )
    finally:
        from .sync import discard

        discard(app)  # a sync client made during the test used this harness's memory transport
        for name, value in saved.items():
            setattr(app, name, value)
