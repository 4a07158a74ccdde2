"""What the dashboard knows without asking on each page: kept up by two background tasks.

* the feed: ``app.events()`` into a :class:`~.index.TaskIndex`, a :class:`~.index.WorkerBoard`
  and a :class:`~.workflows.WorkflowIndex`
  (with events off in the workers nothing arrives, and the pages say so);
* the poller: every ``poll_interval`` seconds, ``queue_stats`` of the known queues, and
  ``inspect stats`` / ``inspect active`` for the workers' slots and running tasks' arguments.

Pages only read these snapshots, so none waits on a broker round trip or on workers' replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..brokers.base import QueueStats
from ..operations import app_queues, queue_stats
from .index import TaskIndex, WorkerBoard
from .workflows import WorkflowIndex

if TYPE_CHECKING:
    from ..app import App

__all__ = ["Live", "QueueRow"]

log = logging.getLogger("aioqueue.dashboard")

_RATE_WINDOW = 60.0  # seconds of samples a rate is taken over


@dataclass(slots=True)
class QueueRow:
    """A queue's latest stats and its rates (per second over the last minute)."""

    stats: QueueStats
    sent_rate: float | None = None
    done_rate: float | None = None
    depth_rate: float | None = None


@dataclass(slots=True)
class _Sample:
    at: float
    depth: int
    sent: int
    done: int


@dataclass
class Live:
    """The dashboard's shared state (one per dashboard)."""

    app: App
    max_tasks: int = 10_000
    poll_interval: float = 2.0
    inspect_timeout: float = 1.0
    index: TaskIndex = field(init=False)
    workers: WorkerBoard = field(init=False)
    workflows: WorkflowIndex = field(init=False)
    queues: dict[str, QueueRow] = field(default_factory=dict)
    feed_error: str = ""
    poll_error: str = ""
    feeding: bool = False
    events_seen: int = 0
    _samples: dict[str, deque[_Sample]] = field(default_factory=dict)
    _sent: dict[str, int] = field(default_factory=dict)
    _done: dict[str, int] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _started: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.index = TaskIndex(self.max_tasks)
        self.workflows = WorkflowIndex(self.max_tasks)
        self.workers = WorkerBoard(stale_after=max(10.0, 5 * self.app.conf.worker_heartbeat_ttl))

    @property
    def events_enabled(self) -> bool:
        """Events are on in this app's settings, or some arrived anyway (workers set them)."""
        return bool(self.app.conf.events) or self.events_seen > 0

    async def start(self) -> None:
        """Start the feed and the poller; returns once the feed is subscribed (or failed)."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._feed()), loop.create_task(self._poll())]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await self._started.wait()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def apply(self, event: Any) -> None:
        """Take one event (the feed calls this; tests may too)."""
        self.events_seen += 1
        if event.type.startswith("worker-"):
            self.workers.add(event)
            return
        if event.type == "workflow-sent":
            self.workflows.add(event)
            return
        record = self.index.add(event)
        if record is None or not record.queue:
            return
        if event.type == "task-sent":
            self._sent[record.queue] = self._sent.get(record.queue, 0) + 1
        elif event.type in ("task-succeeded", "task-failed", "task-revoked"):
            self._done[record.queue] = self._done.get(record.queue, 0) + 1

    async def _feed(self) -> None:
        from_start = True  # the retained events once; after a reconnect only new ones
        while True:
            try:
                async with self.app.events(from_start=from_start) as feed:
                    self.feeding, self.feed_error = True, ""
                    from_start = False
                    self._started.set()
                    async for event in feed:
                        self.apply(event)
            except Exception as exc:  # the dashboard outlives a broker outage
                self.feeding, self.feed_error = False, f"{type(exc).__name__}: {exc}"
                self._started.set()
                log.warning("dashboard: event feed failed (retrying): %s", self.feed_error)
                await asyncio.sleep(self.poll_interval)

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
                self.poll_error = ""
            except Exception as exc:  # shown on the overview; the next poll tries again
                self.poll_error = f"{type(exc).__name__}: {exc}"
                log.warning("dashboard: polling failed: %s", self.poll_error)
            await asyncio.sleep(self.poll_interval)

    def queue_names(self) -> list[str]:
        """The app's queues, then any others seen in events."""
        names = app_queues(self.app)
        return names + sorted(set(self.index.values_of("queue")) - set(names))

    async def refresh(self) -> None:
        """One poll: queue stats, then the workers' stats and running tasks."""
        await self.refresh_queues()
        inspect = self.app.control.inspect(timeout=self.inspect_timeout)
        stats, active = await asyncio.gather(inspect.stats(), inspect.active())
        self.workers.add_stats(stats)
        for rows in active.values():
            for row in rows if isinstance(rows, list) else ():
                record = self.index.get(str(row.get("id")))
                if record is not None:
                    record.args = {"args": row.get("args"), "kwargs": row.get("kwargs")}

    async def refresh_queues(self) -> None:
        now = time.time()
        for stats in await queue_stats(self.app, self.queue_names()):
            samples = self._samples.setdefault(stats.queue, deque())
            sample = _Sample(
                now, stats.depth, self._sent.get(stats.queue, 0), self._done.get(stats.queue, 0)
            )
            samples.append(sample)
            while samples and now - samples[0].at > _RATE_WINDOW:
                samples.popleft()
            row = QueueRow(stats)
            first = samples[0]
            span = now - first.at
            if span > 0:
                row.depth_rate = (sample.depth - first.depth) / span
                if self.events_enabled:
                    row.sent_rate = (sample.sent - first.sent) / span
                    row.done_rate = (sample.done - first.done) / span
            self.queues[stats.queue] = row
