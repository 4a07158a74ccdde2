"""Changing a running worker's queues: ``add_consumer`` and ``cancel_consumer``.

The worker keeps one consumer for its queues. A change starts a new consumer for the new set
(under a worker id of its own, so the two never share a Redis processing list), makes it the one
the fetch loop uses, gives messages parked for a later eta back to their queues untouched, and
retires the old consumer: the old consumer fetches nothing more but stays
open (renewing its lease on Redis) until every message it handed out and that is running now is
settled; then it is closed, giving back whatever it still held (on RabbitMQ,
messages pushed to it after the switch; on Redis, a message a last blocking wait moved). A
stopping worker closes retired consumers after its running tasks, like its current one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from ..brokers.base import Consumer
    from .core import Worker

__all__ = ["QueueSwitch"]

log = logging.getLogger("aioqueue.worker")


class QueueSwitch:
    """The queue changes of one worker, one at a time."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._lock = asyncio.Lock()
        self._generation = 0
        self._retired: dict[Consumer, asyncio.Task[None]] = {}

    async def add(self, queue: str) -> list[str]:
        """Also consume ``queue`` (last in preference); returns the queues now consumed."""
        queue = _queue_name(queue)
        async with self._lock:
            queues = list(self._worker.queues)
            if queue in queues:
                raise ConfigurationError(f"already consuming {queue!r}")
            await self._switch([*queues, queue])
        return list(self._worker.queues)

    async def cancel(self, queue: str) -> list[str]:
        """Stop consuming ``queue``; returns the queues still consumed."""
        queue = _queue_name(queue)
        async with self._lock:
            queues = list(self._worker.queues)
            if queue not in queues:
                raise ConfigurationError(f"not consuming {queue!r} (consuming {queues})")
            if len(queues) == 1:
                raise ConfigurationError(
                    f"{queue!r} is the only queue: a worker needs one (shut it down instead)"
                )
            await self._switch([q for q in queues if q != queue])
        return list(self._worker.queues)

    async def _switch(self, queues: list[str]) -> None:
        worker = self._worker
        old = worker._consumer
        if old is None or worker._stop.is_set():
            raise ConfigurationError("the worker is not consuming (starting or stopping)")
        broker = await worker.app.ready_broker()
        self._generation += 1
        new = broker.consumer(
            queues,
            worker_id=f"{worker.id}.q{self._generation}",
            max_size=worker.app.codec.max_size,
        )
        await new.start()
        worker._consumer = new
        worker.queues = tuple(queues)
        # A fetch waiting on the old consumer gives way (wake), and the loop takes the new one.
        while worker._fetching is old:
            worker._wake.set()
            await asyncio.sleep(0.01)
        await worker._give_back_parked()  # held for a later eta: back to their queues untouched
        running = set(worker._running)
        task = asyncio.get_running_loop().create_task(self._close_when_settled(old, running))
        self._retired[old] = task
        task.add_done_callback(lambda _: self._retired.pop(old, None))
        log.info("worker %s now consumes %s", worker.id, ",".join(queues))

    async def _close_when_settled(self, old: Consumer, running: set[asyncio.Task[None]]) -> None:
        if running:
            await asyncio.wait(running)  # each settles its message before it ends
        try:
            await old.close()
        except Exception:
            log.exception("closing a consumer retired by a queue change failed")

    def retired(self) -> list[Consumer]:
        """Consumers replaced by a queue change and not closed yet (they still hold messages:
        those running, and on RabbitMQ those pushed to them after the change)."""
        return list(self._retired)

    async def aclose(self) -> None:
        """Wait for the retired consumers to close: the worker is stopping and its running
        tasks have ended, so each closes now (none is cut off half way through its close)."""
        closing = list(self._retired.values())
        if closing:
            await asyncio.wait(closing)


def _queue_name(queue: object) -> str:
    if not isinstance(queue, str) or not queue:
        raise ConfigurationError(f"a queue name, not {queue!r}")
    return queue
