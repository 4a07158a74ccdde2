"""Deciding what becomes of one delivery: the decode and execute steps, ending in a disposition.

``Handler.decide`` never raises for anything a message can cause: bad bytes, an unknown task, a
field of the wrong type, arguments that do not bind, too many deliveries, an expired task and an
unencodable result all end in a disposition (see :mod:`aioqueue.worker.settle`). The worker adds
the last guarantee: whatever still escapes (a bug of ours) gives the message back with its
attempt raised, so ``max_attempts`` bounds it too.
"""

from __future__ import annotations

import asyncio
import logging
import re
import reprlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import (
    AioQueueError,
    DeliveryLimitExceeded,
    MessageTooLarge,
    TaskNotRegistered,
)
from ..message import Message, Outcome, States
from .execution import encode_or_fail, execute, failure_outcome
from .settle import Ack, Disposition, Reject, Store

if TYPE_CHECKING:
    from ..app import App
    from ..backends.base import ResultBackend
    from ..brokers.base import Delivery
    from ..task import Task
    from .executors import Runner

__all__ = ["ETA_HOLD", "Handler", "Park", "peek_address", "short"]

log = logging.getLogger("aioqueue.worker")

_short = reprlib.Repr()
_short.maxstring = 80
_short.maxother = 80
_NAME_LIMIT = 80
ETA_HOLD = 0.5
"""A delay due within this many seconds is waited out in the slot; a longer one is parked."""
_ID_IN_PREFIX = re.compile(rb'"id"\s*:\s*"([^"\\]{1,200})"')
_REPLY_IN_PREFIX = re.compile(rb'"reply_to"\s*:\s*"([^"\\]{1,300})"')


def short(text: str) -> str:
    """A task name or id from a message, cut for a log line (a message controls its length)."""
    return text if len(text) <= _NAME_LIMIT else text[: _NAME_LIMIT - 3] + "..."


@dataclass(frozen=True, slots=True)
class Park:
    """Not due yet: free the slot, keep the message, come back to it at ``until``.

    ``give_back`` when the broker will not let the worker hold it that long (AMQP's consumer
    timeout): at ``until`` it goes back to its queue untouched instead of running.
    """

    until: float
    give_back: bool


class Handler:
    """Decode, look up, check, execute: one delivery in, one disposition (or Park) out."""

    def __init__(
        self, app: App, runner: Runner, backend: ResultBackend, *, max_hold: float | None
    ) -> None:
        self.app = app
        self._runner = runner
        self._backend = backend
        self._tasks = app.tasks  # a live read-only view, made once rather than per message
        self._max_hold = max_hold
        self._codec = app.codec
        self._max_size = app.codec.max_size
        self._max_attempts = app.conf.max_attempts
        self._result_ttl = app.conf.result_ttl
        self._early_ack = not app.conf.acks_late
        self._track_started = app.conf.track_started

    async def decide(self, delivery: Delivery, *, due: bool = False) -> Disposition | Park:
        """What to do with ``delivery``; ``due=True`` when it comes back from being parked."""
        error: AioQueueError
        if delivery.size > self._max_size:
            error = MessageTooLarge(
                f"message is {delivery.size} bytes, over max_message_size={self._max_size}"
            )
            return self._reject(delivery, None, error)
        try:
            message = self._codec.decode(delivery.body)
        except AioQueueError as exc:
            return self._reject(delivery, None, exc)
        task = self._tasks.get(message.task)
        if task is None:
            error = TaskNotRegistered(
                f"task {short(message.task)!r} is not registered in app {self.app.name!r} "
                f"(this worker knows {len(self._tasks)} task(s))"
            )
            return self._reject(delivery, message, error)
        limit = task.max_attempts or self._max_attempts
        if delivery.attempt > limit:
            error = DeliveryLimitExceeded(
                f"too many deliveries: attempt {delivery.attempt} of task {short(task.name)} "
                f"is over max_attempts={limit}"
            )
            return self._reject(delivery, message, error)
        ttl = message.result_ttl or task.result_ttl or self._result_ttl
        if message.eta is not None or message.expires is not None:
            scheduled = self._schedule(message, ttl, due=due)
            if scheduled is not None:
                return scheduled
        if delivery.attempt > 1 and await self._already_done(message.id):
            log.info("%s[%s] already has its result: not run again", task.name, message.id)
            return Ack()
        return await self._run(delivery, task, message, ttl)

    def _schedule(self, message: Message, ttl: float, *, due: bool) -> Disposition | Park | None:
        """Expired: REVOKED without running. Not due: park. Due: None (run it now).

        ``due``: back from being parked; expiry is checked again (it may have passed while the
        message waited for a slot), the eta is not.
        """
        now = time.time()
        if message.expires is not None and message.expires < max(now, message.eta or now):
            if message.expires < now:
                why = f"expired {now - message.expires:.3f}s ago"
            else:
                why = "expires before its eta"
            log.warning("%s[%s] revoked, not run: %s", short(message.task), message.id, why)
            revoked = Outcome.revoked(message.id, "expired")
            return Ack(self._store(message.id, revoked, ttl, message))
        if due or message.eta is None or message.eta - now <= ETA_HOLD:
            return None
        if self._max_hold is not None and message.eta - now > self._max_hold:
            return Park(now + self._max_hold, give_back=True)
        return Park(message.eta, give_back=False)

    async def _already_done(self, task_id: str) -> bool:
        """A redelivered message whose task stored its outcome before the worker died: done.

        One read, only on redelivery; if the backend cannot answer, run it again (at least once).
        """
        try:
            raw = await self._backend.get(task_id)
        except AioQueueError:
            return False
        if raw is None:
            return False
        try:
            return self.app.codec.decode_outcome(raw).ready
        except AioQueueError:
            return False

    async def _run(
        self, delivery: Delivery, task: Task[Any, Any], message: Message, ttl: float
    ) -> Disposition:
        app = self.app
        started = time.perf_counter()
        if message.eta is not None:
            delay = message.eta - time.time()
            if delay > 0:  # due within ETA_HOLD: wait it out rather than run early
                await asyncio.sleep(delay)
        early_ack = self._early_ack
        if early_ack:
            await delivery.ack()  # at-most-once, as configured: a crash from here loses it
        track = task.track_started if task.track_started is not None else self._track_started
        on_start = None
        if track:
            await self._store_state(message, States.RECEIVED, ttl)
            on_start = _StateWriter(self, message, ttl)
        outcome, bad_input = await execute(task, message, self._runner, on_start)
        raw, recorded, bad_result = encode_or_fail(app, outcome)
        reason = bad_input or bad_result
        _log_outcome(task, message, recorded, reason, started)
        store = Store(message.id, raw, ttl, message.reply_to)
        if reason is not None and not early_ack:
            return Reject(reason, store)
        return Ack(store, ack=not early_ack)

    def _store(self, task_id: str, outcome: Outcome, ttl: float, message: Message) -> Store:
        return Store(task_id, self.app.codec.encode_outcome(outcome), ttl, message.reply_to)

    async def _store_state(self, message: Message, state: str, ttl: float) -> None:
        raw = self.app.codec.encode_outcome(Outcome(message.id, state, date_done=None))
        try:
            await self._backend.store_state(message.id, raw, ttl=ttl, reply_to=message.reply_to)
        except AioQueueError as exc:  # a state is advice; the final outcome is what counts
            log.warning("could not record %s for %s: %s", state, message.id, exc)

    def _reject(self, delivery: Delivery, message: Message | None, error: Exception) -> Reject:
        """Bad input: FAILURE where an id is known, the raw message kept as a dead letter."""
        task_id: str | None
        if message is not None:
            task_id, reply_to = message.id, message.reply_to
        else:
            task_id, reply_to = peek_address(self.app, delivery.body)
        reason = f"{type(error).__name__}: {error}"
        log.error(
            "rejected a message on %s (task id %s) to the dead letters: %s",
            short(delivery.queue),
            short(task_id or "unknown"),
            _short.repr(reason),
        )
        if task_id is None:
            return Reject(reason)
        ttl = (message.result_ttl if message else None) or self.app.conf.result_ttl
        raw = self.app.codec.encode_outcome(failure_outcome(task_id, error))
        return Reject(reason, Store(task_id, raw, ttl, reply_to))


def peek_address(app: App, body: bytes) -> tuple[str | None, str | None]:
    """(task id, reply_to) of a body that did not decode, or of an oversized body's prefix."""
    task_id, reply_to = app.codec.peek_address(body)
    if task_id is None:
        found = _ID_IN_PREFIX.search(body[:4096])
        task_id = found.group(1).decode("utf-8", "replace") if found else None
        found = _REPLY_IN_PREFIX.search(body[:4096])
        reply_to = found.group(1).decode("utf-8", "replace") if found else None
    return task_id, reply_to


def _log_outcome(
    task: Task[Any, Any], message: Message, outcome: Outcome, reason: str | None, started: float
) -> None:
    elapsed = (time.perf_counter() - started) * 1000
    if outcome.state == States.SUCCESS:
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s[%s] succeeded in %.1f ms: %s",
                task.name,
                short(message.id),
                elapsed,
                _short.repr(outcome.result),
            )
        return
    debug = log.isEnabledFor(logging.DEBUG) and outcome.traceback
    log.error(
        "%s[%s] failed in %.1f ms: %s: %s%s%s",
        task.name,
        short(message.id),
        elapsed,
        outcome.exc_type,
        _short.repr(outcome.exc_message),
        " (dead-lettered)" if reason else "",
        f"\n{outcome.traceback}" if debug else "",
    )


class _StateWriter:
    """The on_start callback: records STARTED when a thread or child takes the task."""

    __slots__ = ("_handler", "_message", "_ttl")

    def __init__(self, handler: Handler, message: Message, ttl: float) -> None:
        self._handler = handler
        self._message = message
        self._ttl = ttl

    async def __call__(self) -> None:
        await self._handler._store_state(self._message, States.STARTED, self._ttl)
