"""The dashboard's memory: recent tasks and live workers, fed by the event stream.

Bounded (``max_tasks``, oldest forgotten first) and read in O(page): every record sits in one
insertion-ordered dict (newest last) and in one ordered dict per state, task name, queue and
worker, so a page of the newest tasks matching a filter walks only the smallest matching dict
from its end, never the whole index.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from ..events import Event

__all__ = ["FILTERS", "STATE_OF_EVENT", "TaskIndex", "TaskRecord", "WorkerBoard", "WorkerRow"]

STATE_OF_EVENT = {
    "task-sent": "PENDING",
    "task-received": "RECEIVED",
    "task-started": "STARTED",
    "task-progress": "PROGRESS",
    "task-retried": "RETRY",
    "task-succeeded": "SUCCESS",
    "task-failed": "FAILURE",
    "task-revoked": "REVOKED",
}
_FINAL = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
FILTERS = ("state", "name", "queue", "worker")
"""The fields a task list can be filtered on (each an exact match)."""
_MAX_HISTORY = 50  # events kept per task (a task retried forever must not grow without end)


@dataclass(slots=True)
class TaskRecord:
    """What the events told about one task; ``history`` is (type, timestamp, details)."""

    task_id: str
    name: str = ""
    queue: str = ""
    worker: str = ""
    state: str = "PENDING"
    attempt: int = 0
    sent: float | None = None
    started: float | None = None
    finished: float | None = None
    runtime: float | None = None
    exception: str = ""
    updated: float = 0.0
    history: list[tuple[str, float, dict[str, Any]]] = field(default_factory=list)
    args: Any = None
    """Masked arguments, when a worker's ``inspect active`` reply showed them."""
    root_id: str = ""
    parent_id: str = ""
    """A workflow step's first task and the task that sent it (from its task-received)."""

    def key(self, name: str) -> str:
        value: str = getattr(self, name)
        return value


class TaskIndex:
    """The newest ``max_tasks`` tasks seen in events, by id, filterable by :data:`FILTERS`."""

    def __init__(self, max_tasks: int = 10_000) -> None:
        if max_tasks < 1:
            raise ValueError("max_tasks must be at least 1")
        self.max_tasks = max_tasks
        self._all: OrderedDict[str, TaskRecord] = OrderedDict()
        self._by: dict[str, dict[str, OrderedDict[str, None]]] = {f: {} for f in FILTERS}
        self.events_seen = 0

    def __len__(self) -> int:
        return len(self._all)

    def get(self, task_id: str) -> TaskRecord | None:
        return self._all.get(task_id)

    def add(self, event: Event) -> TaskRecord | None:
        """Apply one task event (worker events are ignored here); returns the record."""
        state = STATE_OF_EVENT.get(event.type)
        if state is None or not event.task_id:
            return None
        self.events_seen += 1
        record = self._all.get(event.task_id)
        if record is None:
            record = TaskRecord(event.task_id)
            self._all[event.task_id] = record
            if len(self._all) > self.max_tasks:
                self._forget(next(iter(self._all)))
        else:
            self._all.move_to_end(event.task_id)
        self._unfile(record)
        self._update(record, event, state)
        self._file(record)
        return record

    def _update(self, record: TaskRecord, event: Event, state: str) -> None:
        record.name = event.name or record.name
        record.queue = event.queue or record.queue
        record.worker = event.worker or record.worker
        record.attempt = event.attempt or record.attempt
        record.updated = event.timestamp
        if event.type == "task-sent":
            record.sent = event.timestamp
        elif event.type == "task-started":
            record.started = event.timestamp
        if state in _FINAL:
            record.finished = event.timestamp
            record.runtime = event.runtime if event.runtime is not None else record.runtime
        for name in ("root_id", "parent_id"):
            if event.fields.get(name):
                setattr(record, name, str(event.fields[name]))
        if "exception" in event.fields:
            record.exception = str(event.fields["exception"])
        details = dict(event.fields)
        if event.worker:
            details["worker"] = event.worker
        if event.runtime is not None:
            details["runtime"] = event.runtime
        record.history.append((event.type, event.timestamp, details))
        if len(record.history) > 1 and record.history[-2][1] > event.timestamp:
            record.history.sort(key=lambda item: item[1])  # two processes' batches crossed
        del record.history[:-_MAX_HISTORY]
        # the state of the latest event: a task-sent batched late does not undo a start
        record.state = STATE_OF_EVENT[record.history[-1][0]]

    def _file(self, record: TaskRecord) -> None:
        for name in FILTERS:
            value = record.key(name)
            if value:
                self._by[name].setdefault(value, OrderedDict())[record.task_id] = None

    def _unfile(self, record: TaskRecord) -> None:
        for name in FILTERS:
            value = record.key(name)
            bucket = self._by[name].get(value)
            if bucket is not None:
                bucket.pop(record.task_id, None)
                if not bucket:
                    del self._by[name][value]

    def _forget(self, task_id: str) -> None:
        record = self._all.pop(task_id)
        self._unfile(record)

    def values_of(self, name: str) -> list[str]:
        """The values seen for one filter field, sorted (for the filter's drop-down)."""
        return sorted(self._by[name])

    def page(self, filters: dict[str, str], *, limit: int = 50) -> list[TaskRecord]:
        """The newest ``limit`` records matching every filter (exact match), newest first."""
        wanted = {k: v for k, v in filters.items() if k in FILTERS and v}
        return list(islice(self._matching(wanted), limit))

    def _matching(self, wanted: dict[str, str]) -> Iterator[TaskRecord]:
        if not wanted:
            yield from reversed(self._all.values())
            return
        buckets = []
        for name, value in wanted.items():
            bucket = self._by[name].get(value)
            if bucket is None:
                return
            buckets.append(bucket)
        smallest = min(buckets, key=len)
        for task_id in reversed(smallest):
            record = self._all[task_id]
            if all(record.key(name) == value for name, value in wanted.items()):
                yield record

    def count(self, name: str, value: str) -> int:
        bucket = self._by[name].get(value)
        return 0 if bucket is None else len(bucket)


@dataclass(slots=True)
class WorkerRow:
    """One worker as its heartbeats (and the latest ``inspect stats``) describe it."""

    worker: str
    queues: str = ""
    concurrency: int = 0
    busy: int = 0
    processed: int = 0
    last_seen: float = 0.0
    online: bool = True
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def slots_free(self) -> int:
        free = self.stats.get("slots_free")
        return int(free) if isinstance(free, int) else max(self.concurrency - self.busy, 0)


class WorkerBoard:
    """Workers by id, from heartbeat events and inspect replies; a worker whose heartbeat is
    older than ``stale_after`` seconds shows as lost."""

    def __init__(self, stale_after: float = 30.0) -> None:
        self.stale_after = stale_after
        self._rows: dict[str, WorkerRow] = {}

    def add(self, event: Event) -> None:
        if not event.type.startswith("worker-") or not event.worker:
            return
        row = self._rows.setdefault(event.worker, WorkerRow(event.worker))
        fields = event.fields
        row.queues = str(fields.get("queues", row.queues))
        row.concurrency = _int(fields.get("concurrency"), row.concurrency)
        row.busy = _int(fields.get("busy"), row.busy)
        row.processed = _int(fields.get("processed"), row.processed)
        row.last_seen = max(row.last_seen, event.timestamp)
        row.online = event.type != "worker-offline"

    def add_stats(self, replies: dict[str, Any]) -> None:
        """Fold in an ``inspect().stats()`` answer (slots free, running, uptime, ...)."""
        now = time.time()
        for worker, stats in replies.items():
            if not isinstance(stats, dict) or "error" in stats:
                continue
            row = self._rows.setdefault(worker, WorkerRow(worker))
            row.stats = stats
            row.queues = ",".join(str(q) for q in stats.get("queues") or ()) or row.queues
            row.concurrency = _int(stats.get("concurrency"), row.concurrency)
            row.busy = _int(stats.get("running"), row.busy)
            row.processed = _int(stats.get("processed"), row.processed)
            row.last_seen = now
            row.online = True

    def rows(self) -> list[WorkerRow]:
        now = time.time()
        for row in self._rows.values():
            if row.online and now - row.last_seen > self.stale_after:
                row.online = False
        return sorted(self._rows.values(), key=lambda r: (not r.online, r.worker))


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default
