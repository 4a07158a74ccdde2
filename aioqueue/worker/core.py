"""The worker: take a slot, fetch, decode, execute, settle, release.

The data path of one task::

    slots.acquire()                 a slot is taken before any message is fetched
    consumer.fetch(free slots)      one round trip moves up to that many messages into this
                                    worker's processing list (Redis: Lua LMOVE loop / BLMOVE)
    codec.decode(body)              JSON envelope -> Message   (bad bytes: FAILURE + dead letter)
    app.tasks[message.task]         registry lookup             (unknown: FAILURE + dead letter)
    execute(task, message)          await it, or run it on a thread / in a child process
    codec.encode_outcome(outcome)   (unencodable result: FAILURE + dead letter)
    backend.store(outcome)          SET with TTL + PUBLISH to the sender's reply channel
    delivery.ack()                  LREM from the processing list, only after the store
    slots.release()

Writes from concurrent tasks (stores, acks) share pipelines through the command batcher, so
under load a round trip carries many tasks' writes. Per task the worker makes a Message, a
Delivery and an Outcome, and one asyncio task; nothing else on the hot path.

Shutdown (``stop()``, SIGTERM/SIGINT through the CLI): stop fetching, give running tasks
``shutdown_timeout`` seconds, cancel the rest, and return every unsettled message to its queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import reprlib
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from ..errors import AioQueueError, ConfigurationError, TaskExpired, TaskNotRegistered
from ..message import Message, Outcome, States
from .execution import encode_or_fail, execute, failure_outcome
from .executors import Runner
from .slots import Slots

if TYPE_CHECKING:
    from ..app import App
    from ..backends.base import ResultBackend
    from ..brokers.base import Consumer, Delivery
    from ..task import Task

__all__ = ["Worker"]

log = logging.getLogger("aioqueue.worker")
_short = reprlib.Repr()
_short.maxstring = 80
_short.maxother = 80

_FETCH_WAIT = 5.0
_MAX_FETCH_BATCH = 100
_SETTLE_RETRY_DELAYS = (0.05, 0.2, 0.5, 1.0, 2.0)


class Worker:
    """Consumes the app's queues in this process. ``await worker.run()``; ``worker.stop()``."""

    def __init__(
        self,
        app: App,
        *,
        concurrency: int | None = None,
        queues: list[str] | tuple[str, ...] | None = None,
        threads: int | None = None,
        processes: int | None = None,
        max_tasks_per_child: int | None = None,
        burst: bool = False,
        shutdown_timeout: float | None = None,
        worker_id: str | None = None,
    ) -> None:
        conf = app.conf
        self.app = app
        self.concurrency = concurrency if concurrency is not None else conf.worker_concurrency
        self.queues = tuple(queues) if queues else self._default_queues()
        self.burst = burst
        self.shutdown_timeout = (
            shutdown_timeout if shutdown_timeout is not None else conf.worker_shutdown_timeout
        )
        if self.concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1")
        if threads is not None and threads < 1:
            raise ConfigurationError("threads must be at least 1")
        self.id = worker_id or f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        self.ready = asyncio.Event()
        """Set once the worker is connected and consuming: tests start on it."""
        self.processed = 0
        self._slots = Slots(self.concurrency)
        self._runner = Runner(
            app,
            threads=threads or conf.worker_threads,
            processes=processes if processes is not None else conf.worker_processes,
            max_tasks_per_child=max_tasks_per_child or conf.worker_max_tasks_per_child,
        )
        self._running: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        self._consumer: Consumer | None = None
        self._backend: ResultBackend | None = None
        self._tasks = app.tasks  # a live read-only view, made once rather than per message
        self._joint_settle: Callable[..., Awaitable[bool]] | None = None

    def _default_queues(self) -> tuple[str, ...]:
        names = {t.queue for t in self.app.tasks.values() if t.queue}
        return (self.app.conf.default_queue, *sorted(names - {self.app.conf.default_queue}))

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until ``stop()`` (or, in burst mode, until the queues are empty)."""
        broker = await self.app.ready_broker()
        self._backend = await self.app.ready_backend()
        self._joint_settle = getattr(self._backend, "store_and_ack", None)
        await self._runner.start()
        self._consumer = broker.consumer(self.queues, worker_id=self.id)
        await self._consumer.start()
        log.info(
            "worker %s consuming %s from %s (concurrency %d)",
            self.id,
            ",".join(self.queues),
            broker.url,
            self.concurrency,
        )
        self.ready.set()
        consuming = asyncio.get_running_loop().create_task(self._consume(self._consumer))
        stopping = asyncio.get_running_loop().create_task(self._stop.wait())
        try:
            await asyncio.wait({consuming, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if consuming.done():
                consuming.result()  # an unexpected error in the loop surfaces here
        finally:
            stopping.cancel()
            consuming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consuming
            await self._shutdown(self._consumer)

    def stop(self, *, hurry: bool = False) -> None:
        """Stop fetching and drain; ``hurry=True`` cancels running tasks without a grace period."""
        self._stop.set()
        if hurry:
            self._hurry.set()

    @property
    def abandoned_threads(self) -> int:
        """Thread tasks still running; after ``run()``, those abandoned past the grace period."""
        return self._runner.threads_running

    async def __aenter__(self) -> Worker:
        self._run_task = asyncio.get_running_loop().create_task(self.run())
        ready = asyncio.get_running_loop().create_task(self.ready.wait())
        await asyncio.wait({self._run_task, ready}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self._run_task.done():
            self._run_task.result()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.stop()
        await self._run_task

    async def _shutdown(self, consumer: Consumer) -> None:
        if self._running:
            log.info("worker %s draining %d running task(s)", self.id, len(self._running))
            loop = asyncio.get_running_loop()
            drained = loop.create_task(asyncio.wait(set(self._running)))
            hurry = loop.create_task(self._hurry.wait())
            await asyncio.wait(
                {drained, hurry}, timeout=self.shutdown_timeout, return_when="FIRST_COMPLETED"
            )
            drained.cancel()
            hurry.cancel()
        self._runner.begin_close()
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.wait(set(self._running))
        await consumer.close()
        await self._runner.aclose()
        log.info("worker %s stopped after %d task(s)", self.id, self.processed)

    # -- consuming ------------------------------------------------------------------------

    async def _consume(self, consumer: Consumer) -> None:
        batch = min(self.concurrency, _MAX_FETCH_BATCH)
        wait = 0.0 if self.burst else _FETCH_WAIT
        backoff = 0.05
        while True:
            await self._slots.acquire()
            held = 1 + self._slots.take_up_to(batch - 1)
            try:
                deliveries = await consumer.fetch(held, wait)
            except AioQueueError as exc:
                self._slots.release(held)
                log.warning("fetch from broker failed: %s; retrying in %.2fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except BaseException:
                self._slots.release(held)
                raise
            backoff = 0.05
            if len(deliveries) < held:
                self._slots.release(held - len(deliveries))
            if not deliveries and self.burst:
                if not self._running:
                    return
                await self._idle.wait()
                continue
            for delivery in deliveries:
                self._start(delivery)

    def _start(self, delivery: Delivery) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(delivery))
        self._running.add(task)
        self._idle.clear()
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._slots.release()
        self.processed += 1
        if not self._running:
            self._idle.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("task handler crashed", exc_info=task.exception())

    # -- one message ----------------------------------------------------------------------

    async def _handle(self, delivery: Delivery) -> None:
        started = time.perf_counter()
        app = self.app
        try:
            message = app.codec.decode(delivery.body)
        except AioQueueError as exc:
            await self._reject(delivery, None, exc)
            return
        task = self._tasks.get(message.task)
        if task is None:
            error = TaskNotRegistered(
                f"task {message.task!r} is not registered in app {app.name!r} "
                f"(this worker knows {len(app.tasks)} task(s))"
            )
            await self._reject(delivery, message, error)
            return
        ttl = message.result_ttl or task.result_ttl or app.conf.result_ttl
        if message.eta is not None or message.expires is not None:
            expired = await self._honour_schedule(message)
            if expired is not None:
                raw = app.codec.encode_outcome(failure_outcome(message.id, expired))
                await self._settle(delivery, message.id, message.reply_to, raw, ttl, None)
                log.warning("%s[%s] discarded: %s", task.name, message.id, expired)
                return
        track = task.track_started if task.track_started is not None else app.conf.track_started
        if not app.conf.acks_late:
            await delivery.ack()  # at-most-once, as configured: a crash from here loses it
        on_start = None
        if track:
            await self._store_state(message, States.RECEIVED, ttl)
            on_start = _StateWriter(self, message, ttl)
        outcome, bad_input = await execute(task, message, self._runner, on_start)
        raw, bad_result = encode_or_fail(app, outcome)
        reason = bad_input or bad_result
        await self._settle(
            delivery, message.id, message.reply_to, raw, ttl, reason, ack=app.conf.acks_late
        )
        self._log_outcome(task, message, outcome, reason, started)

    @staticmethod
    async def _honour_schedule(message: Message) -> TaskExpired | None:
        """Wait for a future ``eta`` (holding the slot); an expired message is not run.

        Senders cannot set these yet; a worker still obeys an envelope that carries them
        rather than run a task early or late.
        """
        now = time.time()
        if message.eta is not None and message.eta > now:
            if message.expires is not None and message.expires < message.eta:
                return TaskExpired(f"task {message.id} expires before its eta")
            await asyncio.sleep(message.eta - now)
            now = time.time()
        if message.expires is not None and message.expires < now:
            return TaskExpired(f"task {message.id} expired {now - message.expires:.3f}s ago")
        return None

    async def _store_state(self, message: Message, state: str, ttl: float) -> None:
        assert self._backend is not None
        raw = self.app.codec.encode_outcome(Outcome(message.id, state, date_done=None))
        await self._backend.store_state(message.id, raw, ttl=ttl, reply_to=message.reply_to)

    async def _settle(
        self,
        delivery: Delivery,
        task_id: str | None,
        reply_to: str | None,
        raw: bytes | None,
        ttl: float,
        dead_reason: str | None,
        *,
        ack: bool = True,
    ) -> None:
        """Store the outcome, then ack; or, for bad input, dead-letter first, then store.

        Dead-lettering first means a client that sees the FAILURE also finds the message kept.
        Retries through short outages; if the broker or backend stays away, the message is left
        unacked: it goes back to its queue at shutdown, or through another worker's sweep.
        """
        assert self._backend is not None
        steps: list[Callable[[], Awaitable[None]]] = []
        if dead_reason is not None:
            steps.append(partial(delivery.dead_letter, dead_reason))
        joint = self._joint_settle
        if raw is not None and task_id is not None:
            if dead_reason is None and ack and joint is not None:
                steps.append(
                    partial(self._store_and_ack, joint, delivery, task_id, raw, ttl, reply_to)
                )
                ack = False
            else:
                steps.append(partial(self._backend.store, task_id, raw, ttl=ttl, reply_to=reply_to))
        if dead_reason is None and ack:
            steps.append(delivery.ack)
        delays = iter(_SETTLE_RETRY_DELAYS)
        while steps:
            try:
                await steps[0]()
                del steps[0]
            except AioQueueError as exc:
                delay = next(delays, None)
                if delay is None:
                    log.error("could not settle %s: %s; leaving it unacked", delivery.queue, exc)
                    return
                log.warning("settling failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)

    async def _store_and_ack(
        self,
        joint: Callable[..., Awaitable[bool]],
        delivery: Delivery,
        task_id: str,
        raw: bytes,
        ttl: float,
        reply_to: str | None,
    ) -> None:
        """One round trip when backend and broker share a server, else store then ack."""
        assert self._backend is not None
        if not await joint(delivery, task_id, raw, ttl=ttl, reply_to=reply_to):
            await self._backend.store(task_id, raw, ttl=ttl, reply_to=reply_to)
            await delivery.ack()

    async def _reject(self, delivery: Delivery, message: Message | None, error: Exception) -> None:
        """Bad input: record FAILURE where an id is known, keep the raw message as a dead letter."""
        task_id: str | None
        if message is not None:
            task_id, reply_to = message.id, message.reply_to
        else:
            task_id, reply_to = self.app.codec.peek_address(delivery.body)
        reason = f"{type(error).__name__}: {error}"
        raw = None
        if task_id is not None:
            raw = self.app.codec.encode_outcome(failure_outcome(task_id, error))
        ttl = (message.result_ttl if message else None) or self.app.conf.result_ttl
        await self._settle(delivery, task_id, reply_to, raw, ttl, reason)
        log.error("rejected a message on %s to the dead letters: %s", delivery.queue, reason)

    def _log_outcome(
        self,
        task: Task[Any, Any],
        message: Message,
        outcome: Outcome,
        reason: str | None,
        started: float,
    ) -> None:
        elapsed = (time.perf_counter() - started) * 1000
        if outcome.state == States.SUCCESS and reason is None:
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "%s[%s] succeeded in %.1f ms: %s",
                    task.name,
                    message.id,
                    elapsed,
                    _short.repr(outcome.result),
                )
        else:
            log.error(
                "%s[%s] failed in %.1f ms: %s: %s%s",
                task.name,
                message.id,
                elapsed,
                outcome.exc_type,
                outcome.exc_message,
                " (dead-lettered)" if reason else "",
            )


class _StateWriter:
    """The on_start callback: records STARTED when a thread or child takes the task."""

    __slots__ = ("_message", "_ttl", "_worker")

    def __init__(self, worker: Worker, message: Message, ttl: float) -> None:
        self._worker = worker
        self._message = message
        self._ttl = ttl

    async def __call__(self) -> None:
        await self._worker._store_state(self._message, States.STARTED, self._ttl)
