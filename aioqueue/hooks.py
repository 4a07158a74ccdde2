"""Hooks: a task base class's Celery-style callbacks, and app-wide middleware.

Two seams, both sync or async, both safe: a hook that raises is logged (with its traceback)
and the task's outcome, already decided, is stored as if the hook were not there.

* Per task, a subclass of :class:`aioqueue.Task` used as ``@app.task(base=Audited)`` may
  override ``on_success``, ``on_failure``, ``on_retry`` and ``after_return`` with Celery's
  signatures. They run on the worker after the task, before its outcome is stored, so the
  outcome a client reads is never ahead of the hooks' side effects (a hook that blocks delays
  the ack, as in Celery).
* App-wide, :class:`Middleware` objects given to ``App(middleware=[...])`` or
  ``app.add_middleware(...)`` see every send and every run: the seam tracing and metrics use.
  ``before_send`` may return a changed :class:`~aioqueue.Message` (for example with a trace
  header added) and ``after_send`` learns how its publish ended; ``before_execute``,
  ``after_execute`` and ``on_error`` observe a run.

Only hooks that are overridden are called: an app without middleware, or a task on the
default base, pays one truth test per message.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

from .context import Context, Running
from .message import States

if TYPE_CHECKING:
    from .message import Message, Outcome
    from .task import Task

__all__ = ["Middleware", "MiddlewareHooks", "RunObserver", "call_hook", "run_task_hooks"]

log = logging.getLogger("aioqueue.hooks")


class Middleware:
    """Base class for app-wide hooks; override any of them, sync or async."""

    def before_send(self, message: Message) -> Message | Awaitable[Message | None] | None:
        """Called in the sending process before a message is encoded.

        Return a changed message (``dataclasses.replace(message, headers=...)``) or None to
        send it as it is. Called for ``send``, ``send_many`` and ``send_task`` alike.
        """
        return None

    def after_send(self, message: Message, error: BaseException | None) -> Awaitable[None] | None:
        """Called in the sending process once the publish of ``message`` is over.

        ``error`` is what the send raised after ``before_send`` (the broker's refusal, an
        encoding error), or None when the broker took the message, or when nothing had to be
        published because its claimed id was already held (see "Uniqueness"). A tracing span
        started in ``before_send`` ends here, so it covers the publish and shows its failure.
        """
        return None

    def on_received(self, ctx: Context) -> None:
        """Called on the worker when it takes the task, before any eta wait or early ack."""

    def before_execute(self, ctx: Context) -> None:
        """Called on the worker just before the task runs (after its checks passed)."""

    def on_progress(self, ctx: Context, state: str, meta: Any) -> None:
        """Called on the worker for each ``ctx.update_state(state, meta)`` of a running task."""

    def after_execute(self, ctx: Context, outcome: Outcome) -> None:
        """Called after the task ran, with the outcome about to be stored (any state; also
        REVOKED for a revoked or expired task the worker discards without running it)."""

    def on_error(self, ctx: Context, exc: BaseException) -> None:
        """Called when the task raised (also for an error it will be retried for)."""


class RunObserver:
    """Internal: sees the worker's runs from its own records, without a Context built or a
    coroutine per call (task events, :mod:`aioqueue.events`; the worker's metrics,
    :mod:`aioqueue.metrics`). Sync, and must not raise; each method does nothing by default."""

    def received(self, running: Running) -> None:
        """The worker took the task."""

    def started(self, running: Running) -> None:
        """The task is about to run."""

    def progress(self, running: Running, state: str, meta: Any) -> None:
        """The running task recorded a state."""

    def finished(self, running: Running, outcome: Outcome) -> None:
        """The run (or the discarding of a revoked task) ended in ``outcome``."""


def overrides(obj: object, base: type, name: str) -> bool:
    """True when ``obj``'s class defines ``name`` itself rather than inheriting ``base``'s."""
    return getattr(type(obj), name, None) is not getattr(base, name, None)


async def call_hook(owner: str, name: str, hook: Any, *args: Any) -> Any:
    """Call a hook (awaiting it if it is async); log and swallow whatever it raises.

    Returns what the hook returned, or None when it failed.
    """
    try:
        value = hook(*args)
        if value is not None and inspect.isawaitable(value):  # most hooks return None
            value = await value
        return value
    except Exception:
        log.exception("hook %s.%s raised; the task's outcome is kept", owner, name)
        return None


class MiddlewareHooks:
    """The worker-side middleware hooks an app overrides, looked up once per worker."""

    __slots__ = ("after", "before", "errors", "observers", "observers_only", "progress", "received")

    def __init__(
        self, middleware: Sequence[Middleware], observers: Sequence[RunObserver] = ()
    ) -> None:
        # the worker's own (its metrics), then middleware that also observes (task events)
        self.observers = [*observers, *(m for m in middleware if isinstance(m, RunObserver))]
        self.received = [m for m in middleware if overrides(m, Middleware, "on_received")]
        self.progress = [m for m in middleware if overrides(m, Middleware, "on_progress")]
        self.before = [m for m in middleware if overrides(m, Middleware, "before_execute")]
        self.after = [m for m in middleware if overrides(m, Middleware, "after_execute")]
        self.errors = [m for m in middleware if overrides(m, Middleware, "on_error")]
        self.observers_only = bool(self.observers) and not (
            self.received or self.progress or self.before or self.after or self.errors
        )
        """Nothing to await: a worker calls the observers itself and spares a coroutine per
        hook and task (events and metrics on, no middleware of the app's own)."""

    def __bool__(self) -> bool:
        return bool(
            self.before
            or self.after
            or self.errors
            or self.received
            or self.progress
            or self.observers
        )

    async def on_received(self, running: Running) -> None:
        for observer in self.observers:
            observer.received(running)
        if self.received:
            ctx = Context.of(running)
            for item in self.received:
                await call_hook(type(item).__name__, "on_received", item.on_received, ctx)

    async def on_progress(self, running: Running, state: str, meta: Any) -> None:
        for observer in self.observers:
            observer.progress(running, state, meta)
        if self.progress:
            ctx = Context.of(running)
            for item in self.progress:
                name = type(item).__name__
                await call_hook(name, "on_progress", item.on_progress, ctx, state, meta)

    async def before_execute(self, running: Running) -> None:
        for observer in self.observers:
            observer.started(running)
        if self.before:
            ctx = Context.of(running)
            for item in self.before:
                await call_hook(type(item).__name__, "before_execute", item.before_execute, ctx)

    async def after_execute(
        self, running: Running, outcome: Outcome, error: BaseException | None
    ) -> None:
        for observer in self.observers:
            observer.finished(running, outcome)
        if not (self.after or (error is not None and self.errors)):
            return
        ctx = Context.of(running)
        if error is not None:
            for item in self.errors:
                await call_hook(type(item).__name__, "on_error", item.on_error, ctx, error)
        for item in self.after:
            await call_hook(type(item).__name__, "after_execute", item.after_execute, ctx, outcome)


async def run_task_hooks(
    task: Task[Any, Any], message: Message, outcome: Outcome, error: BaseException | None
) -> None:
    """Call the Celery-style hooks ``task``'s class overrides, for ``outcome``.

    ``error`` is what the task raised (None for an outcome that failed only when stored, such
    as an unencodable result: its exception is rebuilt from the outcome).
    """
    hooks = task.hooks
    owner = type(task).__name__
    tid, args, kwargs = message.id, message.args, message.kwargs
    state = outcome.state
    if state == States.SUCCESS:
        retval: Any = outcome.result
        if "on_success" in hooks:
            await call_hook(owner, "on_success", task.on_success, retval, tid, args, kwargs)
    else:
        if error is None:
            from .result import rebuild_exception

            error = rebuild_exception(outcome)
        retval = error
        name = "on_retry" if state == States.RETRY else "on_failure"
        if name in hooks:
            hook = task.on_retry if state == States.RETRY else task.on_failure
            await call_hook(owner, name, hook, error, tid, args, kwargs, outcome.traceback)
    if "after_return" in hooks:
        await call_hook(
            owner,
            "after_return",
            task.after_return,
            state,
            retval,
            tid,
            args,
            kwargs,
            outcome.traceback,
        )


async def observe(
    task: Task[Any, Any],
    middleware: MiddlewareHooks,
    running: Running,
    outcome: Outcome,
    error: BaseException | None,
) -> None:
    """After a run: the task's own hooks, then the middleware's."""
    if task.hooks:
        await run_task_hooks(task, running[0], outcome, error)
    if middleware:
        await middleware.after_execute(running, outcome, error)
