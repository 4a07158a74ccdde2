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
from asyncio import current_task
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any, TypeAlias

from ..context import Running, StateWriter
from ..errors import (
    AioQueueError,
    BadSignature,
    DeliveryLimitExceeded,
    MessageTooLarge,
    TaskNotRegistered,
)
from ..hooks import MiddlewareHooks, RunObserver, observe
from ..limits import TaskLimits
from ..logs import show_tracebacks
from ..masking import mask_outcome, mask_text, sensitive_values, wrap_secrets
from ..message import Message, Outcome, States
from .execution import encode_or_fail, execute, failure_outcome
from .retrying import RetryPlan, after_failure
from .settle import Ack, Disposition, Reject, Resend, Store

if TYPE_CHECKING:
    from ..app import App
    from ..backends.base import ResultBackend
    from ..brokers.base import Delivery
    from ..canvas.flows import Flows
    from ..task import Task
    from .executors import Runner
    from .limiting import Gate
    from .revocations import Revocations

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


_Run: TypeAlias = (
    "Callable[[Delivery, Task[Any, Any], Message, float], Awaitable[Disposition | Park]]"
)


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
    reserved: bool = False
    """A limited task whose rate-limited start is reserved (or needs none)."""
    late_ok: bool = False
    """Runs at ``until`` however late: its start was reserved again once already for being
    late, or it passed its rate check and waits for a concurrency permit."""
    held_since: float | None = None
    """When a limit first kept it aside (bounds the hold where the broker limits it)."""


class Handler:
    """Decode, look up, check, execute: one delivery in, one disposition (or Park) out."""

    def __init__(
        self,
        app: App,
        runner: Runner,
        backend: ResultBackend,
        *,
        max_hold: float | None,
        worker_id: str | None = None,
        revocations: Revocations | None = None,
        gate: Gate | None = None,
        limited: dict[str, TaskLimits] | None = None,
        observers: Sequence[RunObserver] = (),
    ) -> None:
        self.app = app
        self._gate = gate
        self._limited: dict[str, TaskLimits] = limited if limited is not None else {}
        self._revoked: dict[str, float] = revocations.ids if revocations is not None else {}
        self._terminating: set[str] = revocations.terminate if revocations is not None else set()
        # Running now, by task id: (its await, what runs, perf_counter at start); revoke's
        # terminate cancels the await, ``aioqueue inspect active`` reads the rest.
        self._executing: dict[str, tuple[asyncio.Task[Any], Running, float]] = {}
        self._loop = _running_loop()  # current_task(loop) skips a get_running_loop per task
        self._worker_id = worker_id
        # observers: the worker's own (its metrics), told of each run before the middleware
        self._middleware = MiddlewareHooks(app.middleware, observers)
        self._observed = bool(self._middleware)  # read per message: a plain bool, not a call
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
        self._clock = app.clock

        self.flows: Flows | None = None
        """Set by the worker: the chord callbacks' input (see :mod:`aioqueue.canvas.flows`)."""

    async def decide(
        self, delivery: Delivery, *, due: bool = False, parked: Park | None = None
    ) -> Disposition | Park:
        """What to do with ``delivery``; ``due=True`` when it comes back from being parked
        (``parked``: how, which a limited task's gate reads)."""
        message = self._decode(delivery)
        if not isinstance(message, Message):
            return message  # refused: too large, forged or malformed
        error: AioQueueError
        task = self._tasks.get(message.task)
        if task is None and (task := _builtin_task(self.app, message.task)) is None:
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
        if self._revoked and message.id in self._revoked:
            return await self._discard_revoked(message, delivery.attempt, ttl)
        if message.eta is not None or message.expires is not None:
            scheduled = await self._scheduled(message, delivery.attempt, ttl, due)
            if scheduled is not None:
                return scheduled
        if message.workflow is not None and self.flows is not None:
            return await self._run_flow(delivery, task, message, ttl, self.flows, parked)
        if delivery.attempt > 1 and await self._settled_before(message, delivery.attempt):
            return Ack()
        if self._limited and task.name in self._limited:  # the one check a plain task pays
            return await self._limited_run(delivery, task, message, ttl, parked)
        return await self._run(delivery, task, message, ttl)

    async def _scheduled(
        self, message: Message, attempt: int, ttl: float, due: bool
    ) -> Disposition | Park | None:
        """:meth:`_schedule`, with an expired message's REVOKED told to the observers."""
        scheduled = self._schedule(message, ttl, due=due)
        if scheduled is not None and self._observed and isinstance(scheduled, Ack):
            expired = Outcome.revoked(message.id, "expired")
            await self._observe_discarded(message, attempt, expired)
        return scheduled

    def _decode(self, delivery: Delivery) -> Message | Disposition:
        """The delivery's message, or how to refuse it before anything of it is trusted."""
        if delivery.size > self._max_size:
            error = MessageTooLarge(
                f"message is {delivery.size} bytes, over max_message_size={self._max_size}"
            )
            return self._reject(delivery, None, error)
        try:
            return self._codec.decode(delivery.body)
        except BadSignature as exc:
            return _refuse_forged(delivery, exc)
        except AioQueueError as exc:
            return self._reject(delivery, None, exc)

    async def _limited_run(
        self,
        delivery: Delivery,
        task: Task[Any, Any],
        message: Message,
        ttl: float,
        parked: Park | None,
        run: _Run | None = None,
    ) -> Disposition | Park:
        """Through the gate of its rate limit and concurrency cap (aioqueue.worker.limiting);
        ``run``: how it runs once through (a workflow step: under its lease)."""
        run = run or self._run
        limits = self._limited.get(task.name)
        if limits is None or self._gate is None:  # changed while it was being decided
            return await run(delivery, task, message, ttl)
        entered = await self._gate.enter(limits, task.name, message, parked)
        if entered is None:
            return await run(delivery, task, message, ttl)
        if isinstance(entered, Park | Resend):
            return entered
        try:
            return await run(delivery, task, message, ttl)
        finally:
            await entered.release()

    async def _run_flow(
        self,
        delivery: Delivery,
        task: Task[Any, Any],
        message: Message,
        ttl: float,
        flows: Flows,
        parked: Park | None,
    ) -> Disposition | Park:
        """A workflow message. Its outcome is checked first even on a first delivery unless
        steps settle in one script: elsewhere a step can be sent twice (AMQP: a worker died
        after publishing it, before its ack), and the copy must not run again. Redelivered
        and already settled: what it causes is done again, each part idempotent (the same
        ids; a chord counts a member once)."""
        again = delivery.attempt > 1
        if (again or not flows.atomic) and await self._settled_before(message, delivery.attempt):
            if again:
                return await flows.counted_again(message, ttl)
            return Ack()
        prepared = await flows.prepare(message, ttl)
        if type(prepared) is Ack:
            return prepared
        assert isinstance(prepared, Message)
        run: _Run = partial(self._run_leased, flows) if flows.leases else self._run
        if self._limited and task.name in self._limited:  # a step under a rate limit or cap
            return await self._limited_run(delivery, task, prepared, ttl, parked, run)
        return await run(delivery, task, prepared, ttl)

    async def _run_leased(
        self, flows: Flows, delivery: Delivery, task: Task[Any, Any], message: Message, ttl: float
    ) -> Disposition | Park:
        """Run a step under its lease (see :mod:`aioqueue.canvas.flows`): a copy that finds
        it held waits, parked, until the holder's lease would end, then looks again; one that
        finds its outcome stored is dropped (a redelivery does what it causes again)."""
        lease = await flows.take(message)
        if lease is None:
            return await self._run(delivery, task, message, ttl)
        if isinstance(lease, float):
            if lease > 0:
                log.info(
                    "%s[%s] is running elsewhere: this copy waits %.2fs (its lease) to look again",
                    short(message.task),
                    short(message.id),
                    lease,
                )
                return Park(self._clock() + lease, give_back=False)
            log.info("%s[%s] already has its result: not run again", message.task, message.id)
            return await flows.counted_again(message, ttl) if delivery.attempt > 1 else Ack()
        try:
            return await self._run(delivery, task, message, ttl)
        finally:
            lease.end()

    def _schedule(self, message: Message, ttl: float, *, due: bool) -> Disposition | Park | None:
        """Expired: REVOKED without running. Not due: park. Due: None (run it now).

        ``due``: back from being parked; expiry is checked again (it may have passed while the
        message waited for a slot), the eta is not.
        """
        now = self._clock()
        if message.expires is not None and message.expires < max(now, message.eta or now):
            if message.expires < now:
                why = f"expired {now - message.expires:.3f}s ago"
            else:
                why = "expires before its eta"
            log.warning(
                "%s[%s] revoked, not run: %s",
                short(message.task),
                message.id,
                why,
                extra=_fields(message, None, None, "revoked"),
            )
            revoked = Outcome.revoked(message.id, "expired")
            return Ack(Store.of(message, self._codec.encode_outcome(revoked), ttl))
        if due or message.eta is None or message.eta - now <= ETA_HOLD:
            return None
        if self._max_hold is not None and message.eta - now > self._max_hold:
            return Park(now + self._max_hold, give_back=True)
        return Park(message.eta, give_back=False)

    async def _settled_before(self, message: Message, attempt: int) -> bool:
        """A redelivered message that an earlier run already settled: its task stored its
        outcome, or a retry of it (more retries than this copy carries) was sent, before the
        worker died without acking it (AMQP's publish-then-ack). Logged either way.

        One read, only on redelivery; if the backend cannot answer, run it again (at least once).
        """
        if not await self._already_settled(message):
            log.info(
                "%s[%s] redelivered: attempt %d (an earlier run did not finish: its worker "
                "stopped or died)",
                short(message.task),
                short(message.id),
                attempt,
                extra=_fields(message, attempt, None, "redelivered"),
            )
            return False
        return True

    async def _already_settled(self, message: Message) -> bool:
        try:
            raw = await self._backend.get(message.id)
        except AioQueueError:
            return False
        if raw is None:
            return False
        try:
            outcome = self.app.codec.decode_outcome(raw)
        except AioQueueError:
            return False
        if outcome.ready:
            log.info("%s[%s] already has its result: not run again", message.task, message.id)
            return True
        if outcome.retries > message.retries:
            log.info(
                "%s[%s] was already re-sent as retry %d: this copy is not run",
                message.task,
                message.id,
                outcome.retries,
            )
            return True
        return False

    async def _run(  # noqa: C901 - one straight path: a helper would cost a coroutine per task
        self, delivery: Delivery, task: Task[Any, Any], message: Message, ttl: float
    ) -> Disposition:
        started = time.perf_counter()
        early_ack = self._early_ack
        if task.secret_params:  # Secret[...] parameters reach the function wrapped
            args, kwargs = wrap_secrets(task, message.args, message.kwargs)
            message = replace(message, args=args, kwargs=kwargs)
        running: Running = (message, delivery.attempt, self._worker_id, self, False)
        observed, hooks = self._observed, self._middleware
        if observed:
            if hooks.observers_only:
                for observer in hooks.observers:
                    observer.received(running)
            else:
                await hooks.on_received(running)
        on_start = await self._prepare(delivery, task, message, ttl)
        if observed:
            if hooks.observers_only:
                for observer in hooks.observers:
                    observer.started(running)
            else:
                await hooks.before_execute(running)
        if self._revoked and message.id in self._revoked:  # learnt while it was being prepared
            revoked = Outcome.revoked(message.id, "revoked")
            return Ack(self._store(message.id, revoked, ttl, message), ack=not early_ack)
        # Registered so that revoke(terminate=True) can cancel this very await.
        me = current_task(self._loop)
        assert me is not None
        mine = self._executing[message.id] = (me, running, started)
        try:
            ran = await execute(task, message, self._runner, on_start, running)
        except asyncio.CancelledError:
            if not self._terminated_now(message.id, me):
                raise
            return await self._terminated(task, message, ttl, early_ack)
        finally:
            if self._executing.get(message.id) is mine:
                del self._executing[message.id]
        if self._terminating and self._terminated_now(message.id, me):
            return await self._terminated(task, message, ttl, early_ack)  # it swallowed the cancel
        if ran[2] is not None:
            after = after_failure(task, message, ran)
            if isinstance(after, RetryPlan):
                return await self._retry(task, message, after, ttl, early_ack, running, started)
            ran = after
            if task.sensitive:  # nothing about the failure may show a secret argument
                values = sensitive_values(task, message.args, message.kwargs)
                ran = (mask_outcome(ran[0], values), ran[1] and mask_text(ran[1], values), ran[2])
        outcome, bad_input, error = ran
        if message.headers and message.retries:
            outcome = replace(outcome, retries=message.retries)
        raw, recorded, bad_result = encode_or_fail(self.app, outcome)
        reason = bad_input or bad_result
        _log_outcome(task, message, delivery.attempt, recorded, reason, started)
        if task.hooks or observed:
            if task.hooks or not hooks.observers_only:
                await observe(task, hooks, running, recorded, error)
            else:
                for observer in hooks.observers:
                    observer.finished(running, recorded)
        store = Store.of(message, raw, ttl)
        if reason is not None and not early_ack:
            return Reject(reason, store)
        return Ack(store, ack=not early_ack)

    async def _prepare(
        self, delivery: Delivery, task: Task[Any, Any], message: Message, ttl: float
    ) -> _StateWriter | None:
        """Wait out an eta due within ETA_HOLD, ack early if so configured, record RECEIVED;
        returns what records STARTED (None when not tracked)."""
        if message.eta is not None:
            delay = message.eta - self._clock()
            while delay > 0:  # due within ETA_HOLD: wait it out rather than run early
                await asyncio.sleep(delay)
                # The loop sleeps on the monotonic clock, etas are wall-clock times: look again
                # (a slewed or stepped wall clock can leave it short). A clock that did not
                # move (a test's virtual one) is not waited for again.
                left = message.eta - self._clock()
                delay = left if left < delay else 0.0
        if self._early_ack:
            await delivery.ack()  # at-most-once, as configured: a crash from here loses it
        track = task.track_started if task.track_started is not None else self._track_started
        if not track:
            return None
        await self._store_state(message, States.RECEIVED, ttl)
        return _StateWriter(self, message, ttl)

    async def _retry(
        self,
        task: Task[Any, Any],
        message: Message,
        plan: RetryPlan,
        ttl: float,
        acked: bool,
        running: Running,
        started: float,
    ) -> Disposition:
        """Swap the delivery for its retry; if the retry cannot be encoded, fail for good."""
        again = plan.message
        assert again.eta is not None
        try:
            body = self._codec.encode(again)
        except AioQueueError as exc:  # e.g. over max_message_size with the new header
            reason = f"the retry of {message.id} cannot be sent: {exc}"
            failure = failure_outcome(message.id, exc)
            log.error("%s[%s] %s", short(task.name), message.id, reason)
            store = self._store(message.id, failure, ttl, message)
            return Ack(store, ack=False) if acked else Reject(reason, store)
        why, recorded = str(plan.error), plan.state
        if task.sensitive:
            values = sensitive_values(task, message.args, message.kwargs)
            why, recorded = mask_text(why, values), mask_outcome(recorded, values)
        log.warning(
            "%s[%s] retry %d in %.2fs: %s: %s",
            short(task.name),
            short(message.id),
            again.retries,
            max(0.0, again.eta - self._clock()),
            type(plan.error).__name__,
            _short.repr(why),
            extra=_fields(message, running[1], time.perf_counter() - started, "retried"),
        )
        if task.hooks or self._middleware:
            await observe(task, self._middleware, running, recorded, plan.error)
        state = self._store(message.id, recorded, ttl, message)
        return Resend(message.queue, body, again.eta, state, acked=acked)

    def terminate(self, task_id: str) -> None:
        """Stop the run of ``task_id`` here, if there is one (``revoke(terminate=True)``).

        Cancelling the run's await is what stops each kind of task, as at a hard time limit:
        an async task is cancelled, a process child killed and replaced, a thread abandoned
        (its ``ctx.cancelled`` turns True; its result is discarded).
        """
        running = self._executing.get(task_id)
        if running is not None:
            log.warning("%s: terminating it (revoked)", task_id)
            running[0].cancel()

    def executing(self) -> list[tuple[Running, float]]:
        """What runs now, each with its start (``time.perf_counter``): for inspection."""
        return [(running, started) for _, running, started in self._executing.values()]

    def is_terminated(self, task_id: str) -> bool:
        return task_id in self._terminating

    def _terminated_now(self, task_id: str, me: asyncio.Task[Any]) -> bool:
        """True when the cancellation (if any) was ours alone: a shutdown's is passed on."""
        if task_id not in self._terminating:
            return False
        if me.cancelling():
            me.uncancel()
        return not me.cancelling()

    async def _terminated(
        self, task: Task[Any, Any], message: Message, ttl: float, early_ack: bool
    ) -> Disposition:
        log.warning(
            "%s[%s] terminated (revoked): result discarded",
            short(task.name),
            message.id,
            extra=_fields(message, None, None, "revoked"),
        )
        outcome = Outcome.revoked(message.id, "terminated")
        if self._observed:
            entry = self._executing.get(message.id)
            running = entry[1] if entry else (message, 1, self._worker_id, self, False)
            await self._middleware.after_execute(running, outcome, None)
        revoked = self._store(message.id, outcome, ttl, message)
        return Ack(revoked, ack=not early_ack)

    async def _discard_revoked(self, message: Message, attempt: int, ttl: float) -> Ack:
        log.warning(
            "%s[%s] revoked: not run",
            short(message.task),
            message.id,
            extra=_fields(message, attempt, None, "revoked"),
        )
        revoked = Outcome.revoked(message.id, "revoked")
        if self._observed:
            await self._observe_discarded(message, attempt, revoked)
        return Ack(self._store(message.id, revoked, ttl, message))

    async def _observe_discarded(self, message: Message, attempt: int, outcome: Outcome) -> None:
        """The middleware's after_execute for a task discarded without running (REVOKED)."""
        running: Running = (message, attempt, self._worker_id, self, False)
        await self._middleware.after_execute(running, outcome, None)

    def state_writer(self, message: Message) -> StateWriter:
        """``ctx.update_state`` for a task this worker runs: an intermediate state, kept as
        long as the task's result would be."""
        task = self._tasks.get(message.task) or _builtin_task(self.app, message.task)
        task_ttl = task.result_ttl if task is not None else None
        ttl = message.result_ttl or task_ttl or self._result_ttl

        async def write(state: str, meta: Any) -> None:
            outcome = Outcome(message.id, state, meta, retries=message.retries)
            await self._backend.store_state(
                message.id, self._codec.encode_outcome(outcome), ttl=ttl, reply_to=message.reply_to
            )
            if self._observed:
                entry = self._executing.get(message.id)
                running = entry[1] if entry else (message, 1, self._worker_id, self, False)
                await self._middleware.on_progress(running, state, meta)

        return write

    def _store(self, task_id: str, outcome: Outcome, ttl: float, message: Message) -> Store:
        store = Store(task_id, self.app.codec.encode_outcome(outcome), ttl, message.reply_to)
        if message.workflow is not None:
            store.flow = message
        return store

    async def _store_state(self, message: Message, state: str, ttl: float) -> None:
        outcome = Outcome(message.id, state, date_done=None, retries=message.retries)
        raw = self.app.codec.encode_outcome(outcome)
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
        if task_id is None or (message is not None and message.ignore_result):
            return Reject(reason)
        ttl = (message.result_ttl if message else None) or self.app.conf.result_ttl
        raw = self.app.codec.encode_outcome(failure_outcome(task_id, error))
        store = Store(task_id, raw, ttl, reply_to)
        if message is not None and message.workflow is not None:
            store.flow = message
        return Reject(reason, store)


def _builtin_task(app: App, name: str) -> Task[Any, Any] | None:
    """A task every worker knows unregistered (``aioqueue.starmap``); looked up on a miss."""
    from ..canvas.mapping import builtin_task

    return builtin_task(app, name)


def _refuse_forged(delivery: Delivery, error: BadSignature) -> Reject:
    """A body whose MAC does not check out: dead-lettered without its bytes, nothing recorded.

    Nothing of it is trusted, not even its task id: storing a FAILURE under that id would let a
    forger overwrite the result of any task it can name.
    """
    log.error(
        "refused a message on %s to the dead letters, unread and not run: %s",
        short(delivery.queue),
        error,
    )
    return Reject(f"{type(error).__name__}: {error}", keep_body=False)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


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
    task: Task[Any, Any],
    message: Message,
    attempt: int,
    outcome: Outcome,
    reason: str | None,
    started: float,
) -> None:
    """The task's one line (see :mod:`aioqueue.logs`), its fields as record attributes."""
    runtime = time.perf_counter() - started
    if outcome.state == States.SUCCESS:
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s[%s] succeeded in %.1f ms: %s",
                task.name,
                short(message.id),
                runtime * 1000,
                _short.repr(outcome.result),
                extra=_fields(message, attempt, runtime, "succeeded"),
            )
        return
    extra = _fields(message, attempt, runtime, "failed")
    debug = log.isEnabledFor(logging.DEBUG) or show_tracebacks()
    shown = outcome.traceback if outcome.traceback and debug else None
    if shown:
        extra["traceback"] = shown
    log.error(
        "%s[%s] failed in %.1f ms: %s: %s%s%s",
        task.name,
        short(message.id),
        runtime * 1000,
        outcome.exc_type,
        _short.repr(outcome.exc_message),
        " (dead-lettered)" if reason else "",
        f"\n{shown}" if shown else "",
        extra=extra,
    )


def _fields(
    message: Message, attempt: int | None, runtime: float | None, outcome: str
) -> dict[str, Any]:
    return {
        "task_id": message.id,
        "task": message.task,
        "queue": message.queue,
        "attempt": attempt,
        "runtime": None if runtime is None else round(runtime, 6),
        "outcome": outcome,
    }


class _StateWriter:
    """The on_start callback: records STARTED when a thread or child takes the task."""

    __slots__ = ("_handler", "_message", "_ttl")

    def __init__(self, handler: Handler, message: Message, ttl: float) -> None:
        self._handler = handler
        self._message = message
        self._ttl = ttl

    async def __call__(self) -> None:
        await self._handler._store_state(self._message, States.STARTED, self._ttl)
