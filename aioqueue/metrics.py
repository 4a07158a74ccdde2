"""Prometheus metrics of one worker: ``aioqueue worker proj:app --metrics-port 9808``.

Imported only when a worker is given a metrics port (``--metrics-port`` or the
``worker_metrics_port`` setting), so a worker without one neither imports ``prometheus_client``
nor pays anything per task. With one, the worker serves ``/metrics`` from a thread of
``prometheus_client``'s own and records:

* per task run, in the worker's event loop, as its run observer (the middleware seam without a
  Context built per call, see :class:`~aioqueue.hooks.RunObserver`): the outcome counter, the
  runtime and queue-wait histograms and the retries. A process-pool task is recorded the same
  way, by the parent, when its child reports back: children keep no metrics of their own, so
  nothing has to be gathered from them;
* at scrape time, read from the worker without touching its loop: messages in flight, free
  slots, live process-pool children and dead letters made;
* every ``worker_metrics_interval`` seconds, from the broker (``queue_stats``): the depth,
  delayed messages, consumers and dead letters of each queue the worker consumes.

Names follow Prometheus' conventions (``_total`` counters, ``_seconds`` units, lower-case
labels); the README lists them. Each worker has a registry of its own, so two workers in one
process (tests) never mix their series.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .errors import AioQueueError, ConfigurationError
from .hooks import RunObserver

try:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ConfigurationError(
        "worker metrics need prometheus-client: pip install 'aioqueue[metrics]'"
    ) from exc

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from .brokers.base import QueueStats
    from .context import Running
    from .message import Outcome
    from .worker import Worker

__all__ = ["RUNTIME_BUCKETS", "WAIT_BUCKETS", "WorkerMetrics", "check_port"]

log = logging.getLogger("aioqueue.metrics")

RUNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
"""Seconds: from a no-op task to a half-hour batch job."""
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)

_started: contextvars.ContextVar[float] = contextvars.ContextVar("aioqueue_metrics_started")
"""perf_counter() at before_execute, in the run's own asyncio task (no per-task dict to clean)."""


def check_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigurationError(f"metrics port must be a whole number 0-65535, not {port!r}")
    return port


class _Histograms:
    """Histograms by one label's value, written by the event loop alone, without locks.

    A row is ``[count per bucket ..., count above the last bound, sum]``; the scrape thread
    copies a row whole (``list(row)`` holds the GIL throughout), so its buckets and count
    always agree. prometheus_client's own Histogram takes a lock per bucket and per sum on
    every observation: the loop is the only writer here, so none is needed.
    """

    __slots__ = ("bounds", "rows")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.rows: dict[str, list[float]] = {}

    def observe(self, label: str, value: float) -> None:
        row = self.rows.get(label)
        if row is None:
            row = self.rows[label] = [0] * (len(self.bounds) + 1) + [0.0]
        row[bisect_left(self.bounds, value)] += 1  # the first bound >= value: "le" buckets
        row[-1] += value

    def family(self, name: str, documentation: str, label: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=[label])
        edges = [repr(float(b)) for b in self.bounds] + ["+Inf"]  # "0.005", "1.0", as Go
        for value, shared in dict(self.rows).items():
            row = list(shared)
            buckets, total = [], 0.0
            for edge, count in zip(edges, row[:-1], strict=True):
                total += count
                buckets.append((edge, total))
            family.add_metric([value], buckets, sum_value=row[-1])
        return family


class WorkerMetrics(RunObserver):
    """The worker's metrics: an observer of runs plus a collector read at scrape time.

    What runs record is kept in plain dicts and lists that only the worker's event loop
    writes (a few hundred nanoseconds per run, no locks); the collector turns them into
    Prometheus families when scraped.
    """

    def __init__(self, worker: Worker, *, interval: float) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
            raise ConfigurationError(
                f"worker_metrics_interval must be a positive number of seconds, not {interval!r}"
            )
        self.worker = worker
        self.interval = float(interval)
        self.outcomes: dict[tuple[str, str], int] = {}
        """Runs ended, by (task name, state)."""
        self.retries: dict[str, int] = {}
        self.runtime = _Histograms(RUNTIME_BUCKETS)
        self.wait = _Histograms(WAIT_BUCKETS)
        self.sampled: dict[str, QueueStats] = {}
        """The last queue_stats of each consumed queue (replaced whole by the sampler)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_WorkerCollector(self))
        self._server: WSGIServer | None = None
        self._sampler: asyncio.Task[None] | None = None

    # -- one run (RunObserver) ----------------------------------------------------------

    def started(self, running: Running) -> None:
        _started.set(time.perf_counter())
        message = running[0]
        if message.sent_at:
            since = message.sent_at if message.eta is None else max(message.sent_at, message.eta)
            wait = time.time() - since
            self.wait.observe(message.queue, wait if wait > 0.0 else 0.0)

    def finished(self, running: Running, outcome: Outcome) -> None:
        started = _started.get(None)
        name = running[0].task
        if started is not None:
            self.runtime.observe(name, time.perf_counter() - started)
        key = (name, outcome.state)
        outcomes = self.outcomes
        outcomes[key] = outcomes.get(key, 0) + 1
        if outcome.state == "RETRY":
            self.retries[name] = self.retries.get(name, 0) + 1

    # -- serving and sampling -----------------------------------------------------------

    def start(self, port: int, addr: str) -> None:
        """Serve ``/metrics`` on ``addr:port`` and start sampling the queues."""
        try:
            self._server, _ = start_http_server(port, addr, registry=self.registry)
        except OSError as exc:
            raise ConfigurationError(f"cannot serve metrics on {addr}:{port}: {exc}") from exc
        log.info(
            "worker %s serving metrics on http://%s:%s/metrics", self.worker.id, addr, self.port
        )
        self._sampler = asyncio.get_running_loop().create_task(self._sample_forever())

    @property
    def port(self) -> int | None:
        """The port served (useful with port 0: the system picked one)."""
        return None if self._server is None else int(self._server.server_address[1])

    async def aclose(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.wait({self._sampler})
            self._sampler = None
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.shutdown)  # waits for serve_forever to return
            server.server_close()

    async def _sample_forever(self) -> None:
        from .operations import admin_of, queue_stats

        try:
            admin_of(self.worker.app)
        except ConfigurationError as exc:
            log.info("queue depth is not sampled: %s", exc)
            return
        await self.worker.ready.wait()  # the queues exist (AMQP declares them on start)
        failing = False
        while True:
            try:
                # the broker's counts only, all queues at once: no worker is asked
                rows = await queue_stats(self.worker.app, self.worker.queues, ask_workers=False)
                self.sampled = {row.queue: row for row in rows}
                failing = False
            except AioQueueError as exc:
                if not failing:  # once per outage, not every interval
                    log.warning("sampling queue depth failed: %s", exc)
                failing = True
            await asyncio.sleep(self.interval)


class _WorkerCollector(Collector):
    """Gauges read from the worker when Prometheus scrapes (in the server's thread: plain
    reads of ints and of dicts the loop replaces or only adds to)."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        worker = self._metrics.worker
        yield _gauge(
            "aioqueue_worker_tasks_in_flight",
            "Messages this worker holds and is running or settling now.",
            worker.in_flight,
        )
        yield _gauge(
            "aioqueue_worker_slots", "Slots (the worker's concurrency).", worker.concurrency
        )
        yield _gauge(
            "aioqueue_worker_slots_free", "Slots free to take a message.", worker.free_slots
        )
        yield _gauge(
            "aioqueue_worker_parked_messages",
            "Messages held for a future eta without a slot.",
            worker.parked,
        )
        yield _gauge(
            "aioqueue_worker_process_children",
            "Live process-pool children (0 until the first process task).",
            worker.process_children,
        )
        yield from self._run_families()
        dead = CounterMetricFamily(
            "aioqueue_dead_letters",
            "Messages this worker dead-lettered (bad input, unknown task, too many deliveries).",
            labels=("queue",),
        )
        for queue, count in dict(worker.dead_lettered).items():
            dead.add_metric((queue,), count)
        yield dead
        yield from self._queue_gauges()

    def _run_families(self) -> Iterator[Any]:
        metrics = self._metrics
        tasks = CounterMetricFamily(
            "aioqueue_tasks",
            "Task runs ended, by task name and outcome (success, failure, retry).",
            labels=("task", "outcome"),
        )
        for (name, state), count in dict(metrics.outcomes).items():
            tasks.add_metric((name, state.lower()), count)
        yield tasks
        retries = CounterMetricFamily(
            "aioqueue_task_retries", "Retries scheduled, by task name.", labels=("task",)
        )
        for name, count in dict(metrics.retries).items():
            retries.add_metric((name,), count)
        yield retries
        yield metrics.runtime.family(
            "aioqueue_task_runtime_seconds",
            "Seconds a task ran, from its start to its outcome (process tasks included).",
            "task",
        )
        yield metrics.wait.family(
            "aioqueue_task_queue_wait_seconds",
            "Seconds from a message's sending (or its eta, if later) to the start of its run.",
            "queue",
        )

    def _queue_gauges(self) -> Iterator[GaugeMetricFamily]:
        sampled = self._metrics.sampled
        families = {
            "depth": GaugeMetricFamily(
                "aioqueue_queue_depth", "Messages waiting in the queue (sampled).", labels=["queue"]
            ),
            "delayed": GaugeMetricFamily(
                "aioqueue_queue_delayed",
                "Messages waiting for their eta (sampled).",
                labels=["queue"],
            ),
            "consumers": GaugeMetricFamily(
                "aioqueue_queue_consumers",
                "Workers consuming the queue (sampled).",
                labels=["queue"],
            ),
            "dead": GaugeMetricFamily(
                "aioqueue_queue_dead_letters",
                "Dead letters kept for the queue (sampled).",
                labels=["queue"],
            ),
        }
        for queue, stats in sampled.items():
            for field, family in families.items():
                family.add_metric([queue], getattr(stats, field))
        yield from families.values()


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
