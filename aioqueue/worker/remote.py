"""A worker's answers to remote control requests (``aioqueue inspect``, ``aioqueue control``).

Requests arrive on the control bus (see :mod:`aioqueue._control_bus`) beside revocations; each
is answered on a task of its own, so a slow reply never holds up the next command, and nothing
here touches the per-task path: what runs is read from the handler's table of running tasks,
what waits from the worker's parked deliveries, only when asked.

Every reply is plain JSON with secrets masked: settings through the config's masking, task
arguments by name (a keyword argument named like a password or token) and by value (a URL's
password).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from ..brokers.base import ReceivesAhead, sent_at
from ..config import mask_secrets
from ..errors import AioQueueError

if TYPE_CHECKING:
    from .._control_bus import ControlBus
    from ..message import Message
    from .core import Worker

__all__ = ["VERBS", "Responder", "mask_arguments"]

log = logging.getLogger("aioqueue.control")

VERBS = (
    "ping",
    "active",
    "scheduled",
    "reserved",
    "registered",
    "stats",
    "holding",
    "conf",
    "shutdown",
    "add_consumer",
    "cancel_consumer",
)
"""What a worker answers; any other method gets an error reply naming these."""


def mask_arguments(value: Any, name: str = "") -> Any:
    """``value`` made JSON-shaped with secrets masked: anything under a secret-looking name
    (``password=``, ``{"api_key": ...}``), and the password of any URL."""
    if isinstance(value, dict):
        return {str(k): mask_arguments(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_arguments(v, name) for v in value]
    ((_, masked),) = mask_secrets({name or "value": value})
    return masked


REPLY_GRACE = 5.0
"""Seconds a stopping worker waits for the answers it is still sending."""


class Responder:
    """Answers the requests addressed to one worker (all of them, or it by id)."""

    def __init__(self, worker: Worker, bus: ControlBus) -> None:
        self._worker = worker
        self._bus = bus
        self._answering: set[asyncio.Task[None]] = set()
        self._verbs: dict[str, Callable[..., Any]] = {
            "ping": lambda: "pong",
            "active": self.active,
            "scheduled": self.scheduled,
            "reserved": self.reserved,
            "registered": self.registered,
            "stats": self.stats,
            "holding": self.holding,
            "conf": self.conf,
            "shutdown": self.shutdown,
            "add_consumer": worker.switch.add,
            "cancel_consumer": worker.switch.cancel,
        }

    def on_request(self, command: dict[str, Any]) -> None:
        """Called by the bus: answer unless it expired or names other workers."""
        try:
            if float(command.get("expires", 0)) <= time.time():
                return
            destination = command.get("destination")
            if destination and self._worker.id not in destination:
                return
            str(command["reply_to"])
        except (KeyError, TypeError, ValueError):
            log.warning("ignored a malformed control request: %.200r", command)
            return
        task = asyncio.get_running_loop().create_task(self._answer(command))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def finish(self) -> None:
        """Let the answers being sent go out (bounded by ``REPLY_GRACE``) before the worker
        closes its connections: a shutdown's reply is sent after the worker was told to stop,
        and an idle worker stops at once, so without this wait the asker could miss it."""
        if self._answering:
            await asyncio.wait(set(self._answering), timeout=REPLY_GRACE)

    async def _answer(self, command: dict[str, Any]) -> None:
        method = command.get("method")
        arguments = command.get("arguments") or {}
        payload: dict[str, Any] = {"worker": self._worker.id}
        verb = self._verbs.get(method) if isinstance(method, str) else None
        if verb is None:
            payload["error"] = f"unknown method {method!r}; known: {', '.join(VERBS)}"
        else:
            try:
                result = verb(**arguments)
                payload["result"] = await result if inspect.isawaitable(result) else result
            except Exception as exc:  # a bad argument must not cost the worker its control bus
                payload["error"] = f"{type(exc).__name__}: {exc}"
        # plain JSON whatever a task's arguments hold; repr for the rest
        safe = orjson.loads(orjson.dumps(payload, default=repr))
        try:
            await self._bus.reply(str(command["reply_to"]), safe)
        except AioQueueError as exc:
            log.warning("could not reply to a %s request: %s", method, exc)

    # -- the verbs ------------------------------------------------------------------------

    def active(self) -> list[dict[str, Any]]:
        """Tasks running now, longest running first."""
        handler = self._worker._handler
        if handler is None:
            return []
        now_wall, now = time.time(), time.perf_counter()
        rows = [
            _describe(running[0], attempt=running[1], started=now_wall - (now - started))
            for running, started in handler.executing()
        ]
        return sorted(rows, key=lambda row: row["started"])

    def reserved(self) -> list[dict[str, Any]]:
        """Messages this worker holds in a slot but has not started yet."""
        handler = self._worker._handler
        running = {r[0].id for r, _ in handler.executing()} if handler is not None else set()
        rows = []
        for delivery in list(self._worker._running.values()):
            message = self._decode(delivery.body)
            if message is not None and message.id not in running:
                rows.append(_describe(message, attempt=delivery.attempt))
        return rows

    def scheduled(self) -> list[dict[str, Any]]:
        """Messages held for a later eta (parked: they hold no slot), soonest first."""
        rows = []
        for delivery in list(self._worker._parked):
            message = self._decode(delivery.body)
            if message is not None:
                rows.append(_describe(message, attempt=delivery.attempt))
        return sorted(rows, key=lambda row: row["eta"] or 0.0)

    def registered(self) -> list[dict[str, Any]]:
        return [
            {"name": name, "queue": task.queue, "executor": task.executor}
            for name, task in sorted(self._worker.app.tasks.items())
        ]

    def stats(self) -> dict[str, Any]:
        worker = self._worker
        handler = worker._handler
        return {
            "id": worker.id,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "uptime": round(time.time() - worker.started_at, 3),
            "queues": list(worker.queues),
            "concurrency": worker.concurrency,
            # a slot is "free" while no message holds it (the fetch loop waits on free ones)
            "slots_free": worker.concurrency - len(worker._running),
            "running": len(handler.executing()) if handler is not None else 0,
            "reserved": len(worker._running) - (len(handler.executing()) if handler else 0),
            "parked": worker.parked,
            "processed": worker.processed,
            "returned": worker.returned,
            "broker": worker.app.broker.url,
        }

    def holding(self) -> dict[str, dict[str, Any]]:
        """Per queue, the messages this worker holds unsettled (running, waiting for a slot,
        parked for an eta, received from RabbitMQ and not taken yet): ``held``, the
        ``oldest_sent_at`` among them (unix time) and ``undated``, those without a sent time.
        What ``aioqueue queues`` sums into IN FLIGHT and OLDEST where the broker cannot tell."""
        worker = self._worker
        deliveries = [*worker._running.values(), *worker._parked]
        for consumer in (worker._consumer, *worker.switch.retired()):
            if isinstance(consumer, ReceivesAhead):
                deliveries += consumer.received()
        out: dict[str, dict[str, Any]] = {}
        for delivery in deliveries:
            row = out.setdefault(delivery.queue, {"held": 0, "oldest_sent_at": None, "undated": 0})
            row["held"] += 1
            at = sent_at(delivery.body)
            if at is None:
                row["undated"] += 1
            elif row["oldest_sent_at"] is None or at < row["oldest_sent_at"]:
                row["oldest_sent_at"] = at
        return out

    def conf(self) -> dict[str, Any]:
        """The app's settings as this worker runs them, secrets masked."""
        from ..operations import settings_in_use

        return settings_in_use(self._worker.app)

    def shutdown(self) -> str:
        log.warning("worker %s: shutdown requested by remote control", self._worker.id)
        self._worker.stop()
        return "shutting down"

    def _decode(self, body: bytes) -> Message | None:
        try:
            return self._worker.app.codec.decode(body)
        except AioQueueError:
            return None


def _describe(message: Message, *, attempt: int, started: float | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": message.id,
        "name": message.task,
        "queue": message.queue,
        "args": mask_arguments(list(message.args)),
        "kwargs": mask_arguments(message.kwargs),
        "attempt": attempt,
        "retries": message.retries,
        "eta": message.eta,
        "sent_at": message.sent_at or None,
    }
    if started is not None:
        row["started"] = round(started, 6)
        row["runtime"] = round(time.time() - started, 6)
    return row
