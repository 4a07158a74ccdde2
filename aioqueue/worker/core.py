"""The worker: take a slot, fetch, decide, settle, release.

The data path of one task::

    slots.acquire()                 a slot is taken before any message is fetched
    consumer.fetch(free slots)      one round trip moves up to that many messages into this
                                    worker's processing list (Redis: Lua LMOVE loop / BLMOVE)
    handler.decide(delivery)        decode, registry lookup, attempt cap, schedule, execute:
                                    await it, or run it on a thread / in a child process
                                    -> one Disposition: Ack(store) | Reject(reason) | Requeue
    settler.settle(disposition)     store the outcome, then ack (one MULTI/EXEC when the results
                                    live on the broker's Redis); retried until it holds
    slots.release()

Writes from concurrent tasks (stores, acks) share pipelines through the command batcher, so
under load a round trip carries many tasks' writes. Per task the worker makes a Message, a
Delivery, an Outcome and a Disposition, and one asyncio task; nothing else on the hot path.

A message not due yet (a future ``eta``), or a limited task over its rate limit or concurrency
cap (:mod:`aioqueue.worker.limiting`), is parked: its slot is freed and the worker keeps the
delivery, coming back to it when it is due (or giving it back untouched before the broker's own
limit on holding a message, AMQP's consumer timeout).

Shutdown (``stop()``, SIGTERM/SIGINT through the CLI): stop fetching, give parked messages back
untouched, give running tasks ``shutdown_timeout`` seconds, cancel the rest, and return every
unsettled message to its queue (its attempt raised: it may have run).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING

from .._limiter import limiter_for
from ..backends.base import StoresWithAck
from ..errors import AioQueueError, BrokerConnectionError, ConfigurationError, ResultBackendError
from ..events import run_heartbeats
from ..periodic.scheduler import Scheduler
from .consumers import QueueSwitch
from .executors import Runner
from .handler import Handler, Park
from .limiting import Gate, Limits
from .revocations import Revocations
from .settle import Disposition, Reject, Requeue, Settler
from .slots import Slots
from .watchdog import LoopWatchdog

if TYPE_CHECKING:
    from .._control_bus import Listening
    from ..app import App
    from ..backends.base import ResultBackend
    from ..brokers.base import Broker, Consumer, Delivery
    from ..metrics import WorkerMetrics
    from .remote import Responder

__all__ = ["Worker"]

log = logging.getLogger("aioqueue.worker")

_FETCH_WAIT = 5.0
_MAX_FETCH_BATCH = 100
_GIVE_BACK_TIMEOUT = 5.0


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
        schedule: bool = True,
        metrics_port: int | None = None,
        metrics_addr: str | None = None,
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
        """Messages settled with an outcome (run, failed, rejected) by this worker."""
        self.returned = 0
        """Messages given back to their queue unfinished."""
        self.dead_lettered: dict[str, int] = {}
        """Messages this worker dead-lettered, by queue."""
        self.started_at = time.time()
        self._slots = Slots(self.concurrency)
        self._runner = Runner(
            app,
            threads=threads or conf.worker_threads,
            processes=processes if processes is not None else conf.worker_processes,
            max_tasks_per_child=max_tasks_per_child or conf.worker_max_tasks_per_child,
        )
        self._running: dict[asyncio.Task[None], Delivery] = {}  # handled now, and for what
        self._parked: dict[Delivery, asyncio.TimerHandle | None] = {}
        self._resuming: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        self._wake = asyncio.Event()  # a parked message fell due: the fetch wait gives way
        self._consumer: Consumer | None = None
        self._fetching: Consumer | None = None  # the consumer a fetch waits on now
        self.switch = QueueSwitch(self)
        """add_consumer / cancel_consumer: change the queues while running."""
        self._handler: Handler | None = None
        self._settler: Settler | None = None
        # Periodic entries are checked now, before any I/O; burst workers do not schedule.
        self._scheduler = (
            Scheduler(app, owner=f"worker {self.id}")
            if schedule and not burst and app.periodic_entries()
            else None
        )
        self._revocations = Revocations(self._terminate)
        self._limits = Limits(app.tasks)
        self._gate: Gate | None = None
        self._listening: Listening | None = None
        self._responder: Responder | None = None
        self._metrics_at = self._metrics_address(metrics_port, metrics_addr)
        self._metrics: WorkerMetrics | None = None
        if self._metrics_at is not None:  # the module (and prometheus_client) only when asked
            from ..metrics import WorkerMetrics

            self._metrics = WorkerMetrics(self, interval=conf.worker_metrics_interval)
        self._watchdog = LoopWatchdog(
            ((name, task.fn) for name, task in app.tasks.items() if task.executor == "async"),
            threshold=max(1.0, conf.worker_heartbeat_interval),
        )

    def _metrics_address(self, port: int | None, addr: str | None) -> tuple[int, str] | None:
        port = port if port is not None else self.app.conf.worker_metrics_port
        if port is None:
            return None
        from ..metrics import check_port

        return check_port(port), addr or self.app.conf.worker_metrics_addr

    def _default_queues(self) -> tuple[str, ...]:
        names = {t.queue for t in self.app.tasks.values() if t.queue}
        return (self.app.conf.default_queue, *sorted(names - {self.app.conf.default_queue}))

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until ``stop()`` (or, in burst mode, until the queues are empty)."""
        connected = await self._connect()
        if connected is None:
            return  # stopped before the broker came up
        try:
            if self._metrics is not None and self._metrics_at is not None:
                self._metrics.start(*self._metrics_at)
            await self._serve(*connected)
        finally:
            if self._metrics is not None:
                await self._metrics.aclose()
            if self._responder is not None:  # a shutdown's own reply among them
                await self._responder.finish()
            if self._listening is not None:
                await self._listening.aclose()
                self._listening = None

    async def _serve(self, broker: Broker, backend: ResultBackend) -> None:
        joint = (
            backend
            if isinstance(backend, StoresWithAck) and backend.shares_server_with(broker)
            else None
        )
        from ..canvas.flows import Flows  # here: canvas imports the worker's settle types

        flows = Flows(self.app, broker, backend, atomic=joint is not None)
        self._settler = Settler(backend, joint, broker, flows)
        await self._runner.start()
        self._consumer = broker.consumer(
            self.queues, worker_id=self.id, max_size=self.app.codec.max_size
        )
        self._gate = Gate(
            limiter_for(self.app),
            self.app.codec,
            worker_id=self.id,
            lease_ttl=self.app.conf.concurrency_lease_ttl,
            max_hold=self._consumer.max_hold,
        )
        self._handler = Handler(
            self.app,
            self._runner,
            backend,
            max_hold=self._consumer.max_hold,
            worker_id=self.id,
            revocations=self._revocations,
            gate=self._gate,
            limited=self._limits.active,
            observers=() if self._metrics is None else (self._metrics,),
        )
        self._handler.flows = flows
        await self._consumer.start()
        self._watchdog.start()
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
        scheduling = (
            asyncio.get_running_loop().create_task(self._scheduler.run())
            if self._scheduler is not None
            else None
        )
        beating = (
            asyncio.get_running_loop().create_task(run_heartbeats(self))
            if self.app.conf.events
            else None
        )
        try:
            await asyncio.wait({consuming, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if consuming.done():
                consuming.result()  # an unexpected error in the loop surfaces here
        finally:
            if scheduling is not None and self._scheduler is not None:
                self._scheduler.stop()
                with contextlib.suppress(Exception):
                    await scheduling
            if beating is not None:
                beating.cancel()  # it says worker-offline as it ends
                with contextlib.suppress(asyncio.CancelledError):
                    await beating
            stopping.cancel()
            consuming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consuming
            self._watchdog.stop()
            await self._shutdown(self._consumer)
            if self._gate is not None:
                await self._gate.aclose()

    async def _connect(self) -> tuple[Broker, ResultBackend] | None:
        """Connect, retrying with backoff while the broker or backend is not up yet.

        Under docker-compose or Kubernetes a worker often starts before its broker: it waits,
        saying so, instead of exiting. None if ``stop()`` came first.
        """
        delay = 0.5
        while True:
            try:
                connected = await self.app.ready_broker(), await self.app.ready_backend()
                await self._listen()
                return connected
            except (BrokerConnectionError, ResultBackendError) as exc:
                log.warning(
                    "worker %s cannot connect yet: %s; retrying in %.1fs", self.id, exc, delay
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            if self._stop.is_set():
                return None
            delay = min(delay * 2, 10.0)

    async def _listen(self) -> None:
        """Receive revocations (the kept ones first) before the first fetch."""
        if self._listening is not None:
            return
        try:
            control = self.app.control
            control.bus()
        except ConfigurationError as exc:
            log.info("worker %s: revoke is not available: %s", self.id, exc)
            return
        from .remote import Responder

        self._responder = Responder(self, control.bus())
        self._listening = await control.listen(
            self._revocations.add, self._limits.change, self._responder.on_request
        )

    def _terminate(self, task_id: str) -> None:
        if self._handler is not None:
            self._handler.terminate(task_id)

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
        await self._give_back_parked()
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
        unfinished = len(self._running)
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.wait(set(self._running))
        await consumer.close()
        await self.switch.aclose()  # consumers retired by a queue change
        await self._runner.aclose()
        log.info(
            "worker %s stopped: %d task(s) settled, %d returned to their queue",
            self.id,
            self.processed,
            self.returned + unfinished,
        )

    async def _give_back_parked(self) -> None:
        """Parked messages never ran: back to their queue as they were (bounded in time; what
        cannot be given back now, the consumer's close returns)."""
        for task in list(self._resuming):
            task.cancel()
        parked, self._parked = self._parked, {}
        for handle in parked.values():
            if handle is not None:
                handle.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_GIVE_BACK_TIMEOUT):
                for delivery in parked:
                    await delivery.requeue(count_attempt=False)
                    self.returned += 1

    # -- consuming ------------------------------------------------------------------------

    async def _consume(self, consumer: Consumer) -> None:
        batch = min(self.concurrency, _MAX_FETCH_BATCH)
        wait = 0.0 if self.burst else _FETCH_WAIT
        backoff = 0.05
        while True:
            await self._slots.acquire()
            held = 1 + self._slots.take_up_to(batch - 1)
            consumer = self._consumer or consumer  # swapped by add/cancel_consumer
            try:
                self._fetching = consumer
                deliveries = await consumer.fetch(held, wait, self._wake)
                self._wake.clear()
            except AioQueueError as exc:
                self._slots.release(held)
                log.warning("fetch from broker failed: %s; retrying in %.2fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except Exception:
                # A bug of ours must not end the worker: say so loudly, back off, go on.
                self._slots.release(held)
                log.exception("fetch from broker failed unexpectedly; retrying in %.2fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except BaseException:
                self._slots.release(held)
                raise
            finally:
                self._fetching = None
            backoff = 0.05
            if len(deliveries) < held:
                self._slots.release(held - len(deliveries))
            if not deliveries and self.burst:
                if not self._running and not self._parked:
                    return
                await self._idle.wait()
                continue
            for delivery in deliveries:
                self._start(delivery)

    def _start(self, delivery: Delivery, resumed: Park | None = None) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(delivery, resumed))
        self._running[task] = delivery
        self._idle.clear()
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._slots.release()
        if not self._running:
            self._idle.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("task handler crashed", exc_info=task.exception())

    # -- one message ----------------------------------------------------------------------

    async def _handle(self, delivery: Delivery, resumed: Park | None) -> None:
        """Decide, then settle: exactly one disposition per delivery, whatever happens."""
        assert self._handler is not None and self._settler is not None
        decision: Disposition | Park
        if resumed is not None and resumed.give_back:
            decision = Requeue(count_attempt=False)
        else:
            try:
                decision = await self._handler.decide(
                    delivery,
                    due=resumed is not None,
                    parked=resumed,
                )
            except Exception:
                # A bug of ours (or of a hook) must not strand the message: it goes back with
                # its attempt raised, so max_attempts ends the loop if it keeps happening.
                log.exception("handling a message on %s failed; giving it back", delivery.queue)
                decision = Requeue(count_attempt=True)
        if isinstance(decision, Park):
            self._park(delivery, decision)
            return
        await self._settler.settle(delivery, decision)
        if isinstance(decision, Requeue):
            self.returned += 1
        else:
            self.processed += 1
            if type(decision) is Reject:
                queue = delivery.queue
                self.dead_lettered[queue] = self.dead_lettered.get(queue, 0) + 1

    def _park(self, delivery: Delivery, park: Park) -> None:
        """Free the slot, keep the delivery, and come back to it at ``park.until``."""
        loop = asyncio.get_running_loop()
        delay = max(0.0, park.until - self.app.clock())
        self._parked[delivery] = loop.call_later(delay, self._unpark, delivery, park)

    def _unpark(self, delivery: Delivery, park: Park) -> None:
        if delivery not in self._parked:
            return
        self._parked[delivery] = None  # still ours to give back until it has a slot again
        self._wake.set()
        task = asyncio.get_running_loop().create_task(self._resume(delivery, park))
        self._resuming.add(task)
        task.add_done_callback(self._resuming.discard)

    async def _resume(self, delivery: Delivery, park: Park) -> None:
        await self._slots.acquire()
        if self._parked.pop(delivery, False) is False:
            self._slots.release()  # given back by a shutdown meanwhile
            return
        self._start(delivery, park)

    @property
    def parked(self) -> int:
        """Messages held for a future eta, not occupying a slot."""
        return len(self._parked)

    @property
    def in_flight(self) -> int:
        """Messages this worker holds and is running or settling now."""
        return len(self._running)

    @property
    def free_slots(self) -> int:
        """Slots not running a message (those a waiting fetch holds count as free: it gives
        back what it does not fill)."""
        return self.concurrency - len(self._running)

    @property
    def process_children(self) -> int:
        """Live process-pool children (0 before the first process task)."""
        return self._runner.process_children

    @property
    def metrics(self) -> WorkerMetrics | None:
        """The worker's Prometheus metrics when it serves them (see :mod:`aioqueue.metrics`)."""
        return self._metrics
