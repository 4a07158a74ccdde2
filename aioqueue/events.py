"""Task events and worker heartbeats, for dashboards and ``aioqueue events``.

Switched on by the ``events`` setting (``App(events=True)``, ``AIOQUEUE_EVENTS=1``), off by
default. When off nothing is installed: the worker's path is untouched. When on, an internal
:class:`~aioqueue.Middleware` turns the hooks into events, and workers add heartbeats:

    task-sent        in the sending process, before the publish
    task-received    the worker took the message (before an eta wait or an early ack); a
                     workflow's step also has its ``root_id`` and ``parent_id``
    task-started     the task is about to run
    task-progress    ``ctx.update_state(...)`` from the task (state, meta)
    task-retried     it failed and will run again (``retries``, ``eta``, exception)
    task-succeeded   with ``runtime`` (seconds from started)
    task-failed      with ``runtime`` and the exception
    task-revoked     revoked, expired or terminated: not run (or stopped)
    workflow-sent    in the sending process: a workflow's outline (ids and task names, no
                     arguments; see :mod:`aioqueue.canvas.outline`) and its ``nodes`` count
    worker-online / worker-heartbeat / worker-offline   every ``worker_heartbeat_interval``

Where they go (with bounded retention; readers see them live):

* Redis (the result backend's Redis, else the broker's): a stream ``<prefix>:events``, each
  XADD trimmed to about ``events_maxlen`` entries; an entry holds one event (field ``e``) or
  up to 16 written together (field ``b``, one JSON object per line); a reader starts at its
  end (or its start).
* RabbitMQ alone: a topic exchange ``<prefix>.events``, routing key the event type; each reader
  binds an exclusive queue of its own, ``x-max-length`` = ``events_maxlen``.
* memory: straight to the readers in this process.

Emitting never waits on the network: an event is buffered and a background task sends what
accumulated in one round trip (one pipeline on Redis). Events are advice: when the stream is
unreachable they are dropped with a warning, never at the cost of a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from .errors import AioQueueError, ConfigurationError
from .hooks import Middleware, RunObserver
from .message import States

if TYPE_CHECKING:
    from ._redis import CommandBatcher, Commands
    from .app import App
    from .context import Running
    from .message import Message, Outcome
    from .worker import Worker

__all__ = [
    "TASK_EVENTS",
    "WORKER_EVENTS",
    "Event",
    "EventFeed",
    "EventStream",
    "EventsMiddleware",
    "Subscription",
    "event_stream_for",
    "run_heartbeats",
]

log = logging.getLogger("aioqueue.events")

TASK_EVENTS = (
    "task-sent",
    "task-received",
    "task-started",
    "task-progress",
    "task-retried",
    "task-succeeded",
    "task-failed",
    "task-revoked",
)
WORKER_EVENTS = ("worker-online", "worker-heartbeat", "worker-offline")
_HEADS = {kind: b'{"type":"%b","timestamp":' % kind.encode() for kind in TASK_EVENTS}
_BY_STATE = {
    States.SUCCESS: "task-succeeded",
    States.FAILURE: "task-failed",
    States.RETRY: "task-retried",
    States.REVOKED: "task-revoked",
}
_MAX_PENDING = 10_000  # events kept while the stream is slow; older ones are dropped


@dataclass(frozen=True, slots=True)
class Event:
    """One event as readers see it. ``fields`` holds the type's own extras (see the module)."""

    type: str
    timestamp: float
    task_id: str | None = None
    name: str | None = None
    queue: str | None = None
    worker: str | None = None
    attempt: int | None = None
    runtime: float | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "type": self.type,
            "timestamp": self.timestamp,
            "task_id": self.task_id,
            "name": self.name,
            "queue": self.queue,
            "worker": self.worker,
            "attempt": self.attempt,
            "runtime": self.runtime,
        }
        compact = {k: v for k, v in data.items() if v is not None}
        compact.update(self.fields)
        return compact

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        known = ("type", "timestamp", "task_id", "name", "queue", "worker", "attempt", "runtime")
        extras = {k: v for k, v in data.items() if k not in known}
        return cls(
            type=str(data.get("type")),
            timestamp=float(data.get("timestamp") or 0.0),
            task_id=data.get("task_id"),
            name=data.get("name"),
            queue=data.get("queue"),
            worker=data.get("worker"),
            attempt=data.get("attempt"),
            runtime=data.get("runtime"),
            fields=extras,
        )

    def __str__(self) -> str:
        """A human-readable line, as ``aioqueue events`` prints it."""
        when = time.strftime("%H:%M:%S", time.localtime(self.timestamp))
        when += f".{int(self.timestamp * 1000) % 1000:03d}"
        if self.type.startswith("worker-"):
            extra = " ".join(f"{k}={v}" for k, v in self.fields.items())
            return f"{when} {self.type:<16} {self.worker} {extra}".rstrip()
        parts = [f"{when} {self.type:<16} {self.name}[{self.task_id}]"]
        if self.type == "workflow-sent":  # its outline is for programs, not for a line
            return f"{parts[0]} nodes={self.fields.get('nodes')}"
        if self.queue:
            parts.append(f"queue={self.queue}")
        if self.worker:
            parts.append(f"worker={self.worker}")
        if self.attempt:
            parts.append(f"attempt={self.attempt}")
        if self.runtime is not None:
            parts.append(f"runtime={self.runtime * 1000:.1f}ms")
        parts.extend(f"{k}={v}" for k, v in self.fields.items())
        return " ".join(parts)


# -- transports ------------------------------------------------------------------------------


class Subscription(Protocol):
    """One reader's place in the stream: ``await sub.next()`` gives the next event's body."""

    async def next(self) -> bytes: ...

    async def aclose(self) -> None: ...


class EventStream(Protocol):
    """Where events go and are read from (see the module docstring)."""

    async def publish(self, bodies: list[bytes]) -> None: ...

    async def subscribe(self, *, from_start: bool) -> Subscription:
        """Start reading: every event published after this returns is seen."""

    async def aclose(self) -> None: ...


class _QueueSubscription:
    """Bodies pushed into an asyncio queue (memory, and AMQP's consumer callback)."""

    def __init__(self, on_close: Any = None) -> None:
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._on_close = on_close

    async def next(self) -> bytes:
        return await self.inbox.get()

    async def aclose(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            await on_close()


class _MemoryStream:
    def __init__(self, maxlen: int) -> None:
        self._readers: set[_QueueSubscription] = set()
        self._kept: list[bytes] = []
        self._maxlen = maxlen

    async def publish(self, bodies: list[bytes]) -> None:
        self._kept = (self._kept + bodies)[-self._maxlen :]
        for reader in self._readers:
            for body in bodies:
                reader.inbox.put_nowait(body)

    async def subscribe(self, *, from_start: bool) -> Subscription:
        async def forget() -> None:
            self._readers.discard(reader)

        reader = _QueueSubscription(forget)
        for body in self._kept if from_start else ():
            reader.inbox.put_nowait(body)
        self._readers.add(reader)
        return reader

    async def aclose(self) -> None:
        return None


class _RedisSubscription:
    def __init__(self, stream: _RedisStream, last: str) -> None:
        self._stream = stream
        self._last = last
        self._ready: list[bytes] = []

    async def next(self) -> bytes:
        stream = self._stream
        while not self._ready:
            with stream.errors():
                got = await stream.client.xread({stream.key: self._last}, count=500, block=1000)
            for _, entries in got or ():
                for entry_id, values in entries:
                    self._last = entry_id
                    body = values.get(b"e")
                    if isinstance(body, bytes):
                        self._ready.append(body)
                    else:  # several events in one entry (see _stage_entries)
                        lines = values.get(b"b")
                        if isinstance(lines, bytes):
                            self._ready.extend(lines.split(b"\n"))
        return self._ready.pop(0)

    async def aclose(self) -> None:
        return None


_PER_ENTRY = 16
"""Events written as one stream entry, at most: one XADD (and one entry for the server to
make and trim) per write of up to 16 events instead of one per event, which made events the
biggest cost of a busy worker. ``events_maxlen`` counts entries, so the stream holds between
that many events and 16 times as many."""


def _stage_entries(pipe: Commands, key: str, maxlen: int, bodies: list[bytes]) -> None:
    """XADD ``bodies`` in order: an entry's ``e`` field holds one event, its ``b`` field
    several, one JSON object per line (JSON as orjson writes it has no raw newline)."""
    for start in range(0, len(bodies), _PER_ENTRY):
        chunk = bodies[start : start + _PER_ENTRY]
        if len(chunk) == 1:
            pipe.xadd(key, "e", chunk[0], maxlen=maxlen)
        else:
            pipe.xadd(key, "b", b"\n".join(chunk), maxlen=maxlen)


class _SentBatch:
    """Task-sent events submitted as one stage; more join it until the batcher packs it."""

    __slots__ = ("bodies", "future", "key", "last", "maxlen", "packed")

    def __init__(self, key: str, maxlen: int, body: bytes) -> None:
        self.key = key
        self.maxlen = maxlen
        self.bodies = [body]
        self.packed = False
        self.future: asyncio.Future[Any]
        self.last = 0  # the emitter's number of the latest event in it

    def stage(self, pipe: Commands) -> None:
        self.packed = True
        _stage_entries(pipe, self.key, self.maxlen, self.bodies)


class _RedisStream:
    """Writes go through the backend's (or broker's) command batcher: they share round trips
    with the worker's own writes, packed by hiredis rather than a redis-py pipeline."""

    def __init__(
        self,
        client: Any,
        batcher: CommandBatcher,
        key_prefix: str,
        errors: Any,
        maxlen: int,
        send_batcher: CommandBatcher | None = None,
    ) -> None:
        self.client = client
        self.errors = errors
        self.key = f"{key_prefix}:events"
        self._batcher = batcher
        self._maxlen = maxlen
        self.send_batcher = send_batcher
        """The broker's batcher when the broker is this very Redis: a task-sent event queued
        there goes out in the publish's own round trip, ahead of the message."""
        self._sent_batch: _SentBatch | None = None

    async def publish(self, bodies: list[bytes]) -> None:
        await self._batcher.run(self._stage(bodies))

    def submit_batch(self, bodies: list[bytes]) -> asyncio.Future[Any]:
        """Queue events for the batcher's next round trip (see CommandBatcher.submit)."""
        return self._batcher.submit(self._stage(bodies))

    def submit_sent(self, body: bytes) -> _SentBatch:
        """Queue a task-sent event on the broker's batcher, for the publish's round trip.

        Events of one ``send_many`` (or of sends in one loop turn) join the stage still waiting
        to be packed: one stage and one future for the lot, not one per message. Returns that
        batch (its ``future`` ends when the lot was sent).
        """
        assert self.send_batcher is not None
        waiting = self._sent_batch
        if waiting is not None and not waiting.packed:
            waiting.bodies.append(body)
            return waiting
        batch = _SentBatch(self.key, self._maxlen, body)
        batch.future = self.send_batcher.submit(batch.stage)
        self._sent_batch = batch
        return batch

    def _stage(self, bodies: list[bytes]) -> Any:
        return partial(_stage_entries, key=self.key, maxlen=self._maxlen, bodies=bodies)

    async def subscribe(self, *, from_start: bool) -> Subscription:
        if from_start:
            return _RedisSubscription(self, "0-0")
        # the id of the newest entry now ("$" on each read would skip what came in between)
        with self.errors():
            newest = await self.client.xrevrange(self.key, count=1)
        return _RedisSubscription(self, newest[0][0] if newest else "0-0")

    async def aclose(self) -> None:
        return None  # the client belongs to the backend (or broker)


class _AmqpStream:
    def __init__(self, broker: Any, maxlen: int) -> None:
        self._broker = broker
        self.exchange = f"{broker.key_prefix}.events"
        self._maxlen = maxlen
        self._channel: Any = None
        self._exchange: Any = None
        self._lock = asyncio.Lock()

    async def _declare(self, channel: Any) -> Any:
        import aio_pika

        return await channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )

    async def _open(self) -> Any:
        await self._broker.connect()
        with self._broker.errors():
            channel = self._broker.connection.channel(publisher_confirms=False)
            await channel.initialize(timeout=self._broker.connect_timeout)
        return channel

    async def publish(self, bodies: list[bytes]) -> None:
        import aio_pika

        async with self._lock:
            if self._channel is None or self._channel.is_closed:
                channel = await self._open()
                with self._broker.errors():
                    self._exchange = await self._declare(channel)
                self._channel = channel
        with self._broker.errors():
            for body in bodies:
                kind = str(orjson.loads(body).get("type", "event"))
                await self._exchange.publish(aio_pika.Message(body), routing_key=kind)

    async def subscribe(self, *, from_start: bool) -> Subscription:
        channel = await self._open()

        async def close() -> None:
            with contextlib.suppress(Exception):
                await channel.close()

        reader = _QueueSubscription(close)

        async def on_message(message: Any) -> None:
            reader.inbox.put_nowait(message.body)

        try:
            with self._broker.errors():
                exchange = await self._declare(channel)
                queue = await channel.declare_queue(  # under the key prefix, as every name is
                    f"{self.exchange}.reader.{uuid.uuid4().hex}",
                    exclusive=True,
                    auto_delete=True,
                    arguments={"x-max-length": self._maxlen},
                )
                await queue.bind(exchange, routing_key="#")
                await queue.consume(on_message, no_ack=True)
        except BaseException:
            await reader.aclose()
            raise
        return reader

    async def aclose(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()
        if self._broker.delete_queues_on_close and self._broker.connection is not None:
            with contextlib.suppress(Exception):
                async with self._broker.connection.channel() as admin:
                    await admin.exchange_delete(self.exchange)


_memory_streams: dict[int, _MemoryStream] = {}


def event_stream_for(app: App) -> EventStream:
    """The app's event stream: its result backend's Redis, its broker's Redis, memory, or a
    RabbitMQ topic exchange (same choice as the control bus)."""
    from .backends.memory import MemoryBackend
    from .brokers.memory import MemoryBroker

    maxlen = app.conf.events_maxlen
    backend, broker = app.backend, app.broker
    if type(backend).__name__ == "RedisBackend":
        from .backends.redis import RedisBackend
        from .brokers.redis import RedisBroker

        assert isinstance(backend, RedisBackend)
        send_batcher = None
        if isinstance(broker, RedisBroker) and backend.shares_server_with(broker):
            send_batcher = broker.batcher
        return _RedisStream(
            backend.client,
            backend.batcher,
            backend.key_prefix,
            backend.errors,
            maxlen,
            send_batcher=send_batcher,
        )
    if type(broker).__name__ == "RedisBroker":
        from .brokers.redis import RedisBroker

        assert isinstance(broker, RedisBroker)
        return _RedisStream(broker.client, broker.batcher, broker.key_prefix, broker.errors, maxlen)
    if isinstance(broker, MemoryBroker) or isinstance(backend, MemoryBackend):
        owner = broker if isinstance(broker, MemoryBroker) else backend
        stream = _memory_streams.get(id(owner))
        if stream is None:
            stream = _memory_streams[id(owner)] = _MemoryStream(maxlen)
        return stream
    if type(broker).__name__ == "AmqpBroker":
        return _AmqpStream(broker, maxlen)
    raise ConfigurationError(
        f"app {app.name!r}: events need Redis or RabbitMQ; broker {broker.url!r} with result "
        f"backend {backend.url!r} has neither"
    )


class EventFeed:
    """``async for event in app.events():`` reads live events; ``async with app.events() as
    feed:`` subscribes on entry, so nothing published after it is missed, and closes on exit.
    """

    def __init__(self, app: App, *, from_start: bool = False) -> None:
        self._app = app
        self._from_start = from_start
        self._subscription: Subscription | None = None

    async def start(self) -> EventFeed:
        """Subscribe now (the first ``__anext__`` does it otherwise)."""
        if self._subscription is None:
            self._subscription = await event_stream_for(self._app).subscribe(
                from_start=self._from_start
            )
        return self

    def __aiter__(self) -> EventFeed:
        return self

    async def __anext__(self) -> Event:
        await self.start()
        assert self._subscription is not None
        while True:
            body = await self._subscription.next()
            try:
                data = orjson.loads(body)
            except ValueError:
                log.warning("ignored a malformed event: %.200r", body)
                continue
            if isinstance(data, dict):
                return Event.from_dict(data)

    async def aclose(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await subscription.aclose()

    async def __aenter__(self) -> EventFeed:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


# -- emitting --------------------------------------------------------------------------------


class _Emitter:
    """Buffers events and sends each batch in one round trip from a background task.

    ``emit`` never waits. ``written()`` returns once every event emitted before it was sent (or
    dropped): a send awaits it before publishing, so its task-sent is in the stream before any
    worker can take the message and report it received; ``send_many`` awaits it once for all.
    """

    def __init__(self, app: App) -> None:
        self._app = app
        self._stream: EventStream | None = None
        self._pending: list[bytes] = []
        self._emitted = 0  # events emitted so far ...
        self._done = 0  # ... and of those, sent or dropped
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None
        # the Redis path: a submit at the end of the loop turn, and the batches submitted
        self._scheduled: asyncio.Handle | None = None
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._failing = False

    def emit(self, data: dict[str, Any], *, sending: bool = False) -> None:
        self.emit_body(orjson.dumps(data, default=repr), sending=sending)

    def emit_body(self, body: bytes, *, sending: bool = False) -> None:
        """``emit`` of an event already encoded (a JSON object)."""
        self._emitted += 1
        stream = self._stream
        if stream is None and self._flushing is None:
            stream = self._open_stream()
        if sending and isinstance(stream, _RedisStream) and stream.send_batcher is not None:
            # Straight into the broker's batcher: the task-sent event shares the publish's
            # round trip, ahead of the message, instead of one of its own before it.
            try:
                batch = stream.submit_sent(body)
            except RuntimeError:  # no running loop (a sync caller): the batch path below
                pass
            else:
                if not batch.last:  # a new batch: one callback for all it will carry
                    batch.future.add_done_callback(partial(self._submitted, batch))
                batch.last = self._emitted
                return
        self._pending.append(body)
        if len(self._pending) > _MAX_PENDING:
            del self._pending[: len(self._pending) - _MAX_PENDING]
        if self._flushing is not None or self._scheduled is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a sync caller): sent with the next batch
        if isinstance(stream, _RedisStream):
            # Handed to the batcher at the end of this loop turn, without a task: the run's
            # store and ack, if they come first, go out at once, and the events follow in the
            # next round trip (never making a settle wait for them).
            self._scheduled = loop.call_soon(self._submit_pending, stream)
        else:
            self._flushing = loop.create_task(self._flush())

    def _submit_pending(self, stream: _RedisStream) -> None:
        self._scheduled = None
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        future = stream.submit_batch(batch)
        self._in_flight.add(future)
        future.add_done_callback(partial(self._batch_done, self._emitted, len(batch)))

    def _batch_done(self, upto: int, count: int, future: asyncio.Future[Any]) -> None:
        """``count`` events, the last of them number ``upto``, were sent or dropped (a batcher
        keeps order: every event before them is done too)."""
        self._in_flight.discard(future)
        exc = None if future.cancelled() else future.exception()
        if exc is not None:
            (log.debug if self._failing else log.warning)("dropped %d event(s): %s", count, exc)
        self._failing = exc is not None
        self._done = max(self._done, upto)
        self._wake_writers()

    def _open_stream(self) -> EventStream | None:
        try:
            self._stream = event_stream_for(self._app)
        except AioQueueError as exc:
            (log.debug if self._failing else log.warning)("events not sent: %s", exc)
            self._failing = True
        return self._stream

    def _submitted(self, batch: _SentBatch, future: asyncio.Future[Any]) -> None:
        """The task-sent events of ``batch`` were sent or dropped."""
        self._batch_done(batch.last, len(batch.bodies), future)

    @property
    def sent_in_order(self) -> bool:
        """A task-sent event needs no wait before the publish: it goes in the publish's own
        round trip, ahead of the message (the broker's Redis holds the stream)."""
        stream = self._stream
        return isinstance(stream, _RedisStream) and stream.send_batcher is not None

    async def written(self) -> None:
        if self._done >= self._emitted:
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((self._emitted, future))
        await asyncio.shield(future)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                upto = self._emitted
                try:
                    if self._stream is None:
                        self._stream = event_stream_for(self._app)
                    await self._stream.publish(batch)
                    self._failing = False
                except (AioQueueError, OSError) as exc:
                    (log.debug if self._failing else log.warning)(
                        "dropped %d event(s): %s", len(batch), exc
                    )
                    self._failing = True
                finally:
                    self._done = max(self._done, upto)  # sent or dropped: waiters go on
                    self._wake_writers()
        finally:
            self._flushing = None
            self._done = self._emitted - len(self._pending)
            self._wake_writers()

    def _wake_writers(self) -> None:
        if self._waiters:
            done, self._waiters = (
                [w for w in self._waiters if w[0] <= self._done],
                [w for w in self._waiters if w[0] > self._done],
            )
            for _, future in done:
                if not future.done():
                    future.set_result(None)

    async def aclose(self) -> None:
        """Send what is pending (bounded in time), then let go of the stream."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                while self._flushing is not None:
                    await asyncio.shield(self._flushing)
                scheduled, stream = self._scheduled, self._stream
                if scheduled is not None and isinstance(stream, _RedisStream):
                    scheduled.cancel()
                    self._submit_pending(stream)
                if self._in_flight:
                    await asyncio.wait(set(self._in_flight))
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.aclose()


class EventsMiddleware(Middleware, RunObserver):
    """Turns sends and runs into events (installed by ``events=True``): ``before_send`` in the
    sending process, the :class:`~aioqueue.hooks.RunObserver` calls on the worker."""

    def __init__(self, app: App) -> None:
        self.emitter = _Emitter(app)
        self._started: dict[str, float] = {}
        # per run (by task id): the run's record and the JSON of the fields all its events
        # share, encoded once for its three or more events
        self._shared: dict[str, tuple[Running, bytes]] = {}

    def _task(self, kind: str, running: Running, extra: dict[str, Any] | None = None) -> None:
        message = running[0]
        shared = self._shared.get(message.id)
        if shared is None or shared[0] is not running:
            if len(self._shared) >= _MAX_PENDING:  # runs that never finished (cannot happen
                del self._shared[next(iter(self._shared))]  # unless a worker broke): bounded
            fields = {
                "task_id": message.id,
                "name": message.task,
                "queue": message.queue,
                "worker": running[2],
                "attempt": running[1],
            }
            shared = self._shared[message.id] = (running, b"," + orjson.dumps(fields)[1:-1])
        # joined, not %-formatted: three or more events per task on a busy worker
        parts = [_HEADS[kind], orjson.dumps(time.time()), shared[1]]
        if extra:
            parts += (b",", orjson.dumps(extra, default=repr)[1:-1])
        parts.append(b"}")
        self.emitter.emit_body(b"".join(parts))

    def before_send(self, message: Message) -> None:
        self.emitter.emit(  # the send awaits emitter.written() before it publishes
            {
                "type": "task-sent",
                "timestamp": time.time(),
                "task_id": message.id,
                "name": message.task,
                "queue": message.queue,
                "eta": message.eta,
                "retries": message.retries or None,
            },
            sending=True,
        )

    def received(self, running: Running) -> None:
        message = running[0]
        extra: dict[str, Any] = {}
        if message.eta is not None:
            extra["eta"] = message.eta
        if message.root_id is not None:  # a workflow's step: where it belongs, for a dashboard
            extra["root_id"] = message.root_id
        if message.parent_id is not None:
            extra["parent_id"] = message.parent_id
        self._task("task-received", running, extra)

    def started(self, running: Running) -> None:
        self._started[running[0].id] = time.perf_counter()
        self._task("task-started", running)

    def progress(self, running: Running, state: str, meta: Any) -> None:
        self._task("task-progress", running, {"state": state, "meta": meta})

    def finished(self, running: Running, outcome: Outcome) -> None:
        started = self._started.pop(running[0].id, None)
        kind = _BY_STATE.get(outcome.state, "task-failed")
        extra: dict[str, Any] = {}
        if started is not None:  # not round()ed: that formats and parses the float
            extra["runtime"] = time.perf_counter() - started
        if outcome.exc_type is not None:
            extra["exception"] = f"{outcome.exc_type}: {outcome.exc_message}"
        if kind == "task-retried":
            extra["retries"] = outcome.retries
            if outcome.eta is not None:
                extra["eta"] = outcome.eta
        self._task(kind, running, extra)
        self._shared.pop(running[0].id, None)


def events_middleware(app: App) -> EventsMiddleware | None:
    for item in app.middleware:
        if isinstance(item, EventsMiddleware):
            return item
    return None


async def sent_events_written(app: App) -> None:
    """For a send: its task-sent event(s) are in the stream before the message is published."""
    events = events_middleware(app)
    if events is not None and not events.emitter.sent_in_order:
        await events.emitter.written()


def workflow_sent(app: App, node: dict[str, Any]) -> None:
    """Emit ``workflow-sent`` for a workflow about to be published (events on): its outline,
    so a dashboard can show the tree of any of its tasks. Never waits (see :class:`_Emitter`)."""
    from .canvas.outline import outline

    events = events_middleware(app)
    if events is None:
        return
    shape, nodes = outline(node)
    first = shape
    while first["t"] != "s":  # the first task: the event's task_id, for a reader's filter
        parts = first.get("steps") or first.get("members") or first.get("header")
        if not parts:
            break
        first = parts[0]
    events.emitter.emit(
        {
            "type": "workflow-sent",
            "timestamp": time.time(),
            "task_id": first.get("id"),
            "name": {"s": "task", "c": "chain", "g": "group", "ch": "chord"}[node["t"]],
            "workflow": shape,
            "nodes": nodes,
        }
    )


async def run_heartbeats(worker: Worker) -> None:
    """worker-online, a worker-heartbeat every ``worker_heartbeat_interval``, and
    worker-offline when cancelled (as the worker stops)."""
    events = events_middleware(worker.app)
    if events is None:
        return
    interval = worker.app.conf.worker_heartbeat_interval

    def beat(kind: str) -> None:
        assert events is not None
        running = len(worker._running)
        events.emitter.emit(
            {
                "type": kind,
                "timestamp": time.time(),
                "worker": worker.id,
                "queues": ",".join(worker.queues),
                "concurrency": worker.concurrency,
                "busy": running,
                "processed": worker.processed,
            }
        )

    beat("worker-online")
    try:
        while True:
            await asyncio.sleep(interval)
            beat("worker-heartbeat")
    finally:
        beat("worker-offline")
