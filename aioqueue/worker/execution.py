"""Run one task and describe how it ended: the "execute" step of decode / execute / settle.

Shared by the worker and by ``Task.apply``, so an eager call fails exactly as a remote one would.

Time limits (``timeout``, ``soft_timeout``: the message's if it carries them, else the task's)
start when the task starts running, after any wait for a free thread or child, and apply
around the call only when one is set: a task without limits takes the plain path, which
creates nothing extra. With a hard limit the call runs under one ``asyncio.timeout`` (one
timer); at the limit that cancels it, and cancelling the await is what stops each kind of task:
an async task is cancelled, a process task's child is killed and replaced, a thread task is
abandoned (Python cannot stop a thread: its function runs on, counted by
``Runner.threads_running``, its result discarded, its slot free for the next task). The
outcome is FAILURE with :class:`TimeLimitExceeded`, acked like any failure, not dead-lettered.

A soft limit (async tasks only) is one more timer; at it the task's current await raises
:class:`SoftTimeLimitExceeded`, so the task can clean up. asyncio can only throw
``CancelledError`` into a task, so the task's coroutine is driven through :class:`_SoftLimited`,
which passes every step through and turns the one cancellation its own timer caused into
that exception (undoing the cancellation request with ``Task.uncancel``). Each resume of the
task then goes through one more generator frame: the cost of a soft limit.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Coroutine, Generator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeAlias

import orjson

from ..context import Context, Running, running_task
from ..errors import (
    AioQueueError,
    ConfigurationError,
    InvalidArguments,
    SerializationError,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
)
from ..message import Message, Outcome, States
from .executors import ChildTaskError, OnStart, Runner

if TYPE_CHECKING:
    from ..app import App
    from ..task import Task

__all__ = ["Ran", "encode_or_fail", "execute", "failure_outcome", "type_name"]


def type_name(exc_type: type[BaseException]) -> str:
    return f"{exc_type.__module__}.{exc_type.__qualname__}"


def _jsonable_args(exc: BaseException) -> tuple[Any, ...]:
    try:
        orjson.dumps(exc.args)
    except TypeError:
        return (str(exc),)
    return exc.args


def failure_outcome(task_id: str, exc: BaseException) -> Outcome:
    """A FAILURE outcome that keeps the exception's type, message, args and traceback."""
    return Outcome(
        task_id=task_id,
        state=States.FAILURE,
        exc_type=type_name(type(exc)),
        exc_message=str(exc),
        exc_args=_jsonable_args(exc),
        traceback="".join(traceback.format_exception(exc)),
        date_done=time.time(),
    )


def _arguments_fit(task: Task[Any, Any], message: Message) -> str | None:
    """None if the arguments bind to the task's signature, else why they do not."""
    try:
        task.signature.bind(*message.args, **message.kwargs)
    except TypeError as exc:
        return f"arguments do not fit {task.name}{task.signature}: {exc}"
    return None


def _positional(task: Task[Any, Any], message: Message, running: Running | None) -> tuple[Any, ...]:
    """A bound task's positional arguments: its Context first."""
    assert running is not None
    return (Context.of(running), *message.args)


async def _call(
    task: Task[Any, Any],
    message: Message,
    runner: Runner,
    on_start: OnStart | None,
    running: Running | None,
) -> Any:
    if task.executor == "async":
        if on_start is not None:
            await on_start()
        args = _positional(task, message, running) if task.bind else message.args
        return await task.fn(*args, **message.kwargs)
    if task.executor == "thread":
        args = _positional(task, message, running) if task.bind else message.args
        return await runner.run_in_thread(task.fn, args, message.kwargs, on_start)
    context = on_state = None
    if task.bind:
        assert running is not None
        context = child_context(running)
        sink = running[3]
        on_state = sink.state_writer(message) if sink is not None else None
    return await runner.run_in_process(
        task, message.args, message.kwargs, on_start, context, on_state
    )


def child_context(running: Running) -> dict[str, Any]:
    """A bound process task's Context as plain values, for the child to rebuild."""
    message, attempt = running[0], running[1]
    return {
        "id": message.id,
        "name": message.task,
        "queue": message.queue,
        "attempt": attempt,
        "retries": message.retries,
        "eta": message.eta,
        "expires": message.expires,
        "headers": message.headers,
        "parent_id": message.parent_id,
        "root_id": message.root_id,
        "is_eager": running[4],
    }


class _Limits:
    """A task's time limits, armed when it starts: the ``on_start`` given to the runner."""

    __slots__ = (
        "_on_start",
        "_scope",
        "_soft_handle",
        "baseline",
        "hard",
        "owner",
        "soft",
        "state",
    )

    def __init__(
        self,
        hard: float | None,
        soft: float | None,
        scope: asyncio.Timeout,
        on_start: OnStart | None,
    ) -> None:
        self.hard = hard
        self.soft = soft
        self._scope = scope
        self._on_start = on_start
        self._soft_handle: asyncio.TimerHandle | None = None
        self.owner: asyncio.Task[Any] | None = None
        self.baseline = 0
        self.state = "armed"
        """"armed", then "fired" once the soft timer cancelled the task, then "raised"."""

    async def __call__(self) -> None:
        if self._on_start is not None:
            await self._on_start()  # recording STARTED is our time, not the task's
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.hard is not None:
            self._scope.reschedule(now + self.hard)
        if self.soft is not None:
            self.owner = asyncio.current_task()
            assert self.owner is not None
            self.baseline = self.owner.cancelling()
            self._soft_handle = loop.call_at(now + self.soft, self._fire_soft)

    def _fire_soft(self) -> None:
        assert self.owner is not None
        self.state = "fired"
        self.owner.cancel()

    def disarm(self) -> None:
        if self._soft_handle is not None:
            self._soft_handle.cancel()

    def translate(self, exc: BaseException) -> BaseException:
        """The exception to throw into the task: ours for the soft timer's cancellation.

        Only when no other cancellation (a shutdown, the hard limit) is pending as well.
        """
        owner = self.owner
        if (
            self.state == "fired"
            and isinstance(exc, asyncio.CancelledError)
            and owner is not None
            and owner.cancelling() == self.baseline + 1
        ):
            owner.uncancel()
            self.state = "raised"
            return SoftTimeLimitExceeded(f"soft time limit of {self.soft}s exceeded")
        return exc


class _SoftLimited:
    """Awaits a coroutine step by step, as ``await`` would, translating the soft cancellation."""

    __slots__ = ("_coro", "_limits")

    def __init__(self, coro: Coroutine[Any, Any, Any], limits: _Limits) -> None:
        self._coro = coro
        self._limits = limits

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                yielded = coro.send(value) if error is None else coro.throw(error)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            try:
                value = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                error = self._limits.translate(exc)


async def _call_limited(
    task: Task[Any, Any],
    message: Message,
    runner: Runner,
    on_start: OnStart | None,
    hard: float | None,
    soft: float | None,
    running: Running | None,
) -> Any:
    """``_call`` under the time limits; raises TimeLimitExceeded at the hard one."""
    if soft is not None and hard is not None and soft >= hard:
        soft = None  # e.g. a send's shorter timeout overrode the task's: it would never fire
    scope = asyncio.timeout(None)  # armed when the task starts, see _Limits
    limits = _Limits(hard, soft, scope, on_start)
    try:
        async with scope:
            value = await _limited(task, message, runner, limits, running)
    except Exception as exc:
        if scope.expired():
            raise _time_limit_exceeded(task, hard) from exc
        raise
    if scope.expired():  # it swallowed the cancellation and returned: still too late
        raise _time_limit_exceeded(task, hard)
    return value


async def _limited(
    task: Task[Any, Any],
    message: Message,
    runner: Runner,
    limits: _Limits,
    running: Running | None,
) -> Any:
    if task.executor != "async":
        # limits start with the thread/child
        return await _call(task, message, runner, limits, running)
    await limits()
    args = _positional(task, message, running) if task.bind else message.args
    coro = task.fn(*args, **message.kwargs)
    if limits.soft is None:
        return await coro
    try:
        return await _SoftLimited(coro, limits)
    finally:
        limits.disarm()


def _time_limit_exceeded(task: Task[Any, Any], hard: float | None) -> TimeLimitExceeded:
    return TimeLimitExceeded(f"task {task.name} exceeded its time limit of {hard}s")


def _limits_of(
    task: Task[Any, Any], message: Message
) -> tuple[float | None, float | None, str | None]:
    """(hard, soft, why the message is bad): the message's limits, else the task's."""
    hard = message.timeout if message.timeout is not None else task.timeout
    soft = message.soft_timeout if message.soft_timeout is not None else task.soft_timeout
    if soft is not None and task.executor != "async":
        return (
            hard,
            soft,
            (
                f"soft_timeout applies to async tasks only; {task.name} runs in a "
                f"{task.executor} and cannot be interrupted to clean up"
            ),
        )
    return hard, soft, None


Ran: TypeAlias = tuple[Outcome, "str | None", "BaseException | None"]
"""How one run ended: (the outcome, why the message is bad or None, the exception the task
raised or None: rebuilt here for a process task, for retries and hooks). A plain tuple: one is
made per task."""


async def execute(  # noqa: C901 - one flat pass; a helper would cost every task an await
    task: Task[Any, Any],
    message: Message,
    runner: Runner,
    on_start: OnStart | None = None,
    running: Running | None = None,
) -> Ran:
    """Run the task; returns its outcome and, when the message itself is bad, why.

    ``running`` is what :func:`~aioqueue.current_context` reports inside the task (and a bound
    task's Context). A TypeError is only blamed on the message after checking that its
    arguments really do not bind to the signature, so the check costs nothing on the success
    path.
    """
    error: AioQueueError
    if task.arguments is not None:  # typed hints: rebuild (and check) the arguments first
        try:
            args, kwargs = task.arguments.apply(message.args, message.kwargs)
        except ValueError as exc:
            unfit = f"arguments do not fit {task.name}{task.signature}: {exc}"
            error = InvalidArguments(unfit)
            return (failure_outcome(message.id, error), unfit, error)
        message = replace(message, args=args, kwargs=kwargs)
    token = running_task.set(running) if running is not None else None
    try:
        if (
            message.timeout is None
            and message.soft_timeout is None
            and task.timeout is None
            and task.soft_timeout is None
        ):
            value = await _call(task, message, runner, on_start, running)
        else:
            hard, soft, bad = _limits_of(task, message)
            if bad is not None:
                error = ConfigurationError(bad)
                return (failure_outcome(message.id, error), bad, error)
            value = await _call_limited(task, message, runner, on_start, hard, soft, running)
    except ChildTaskError as exc:
        outcome = exc.outcome(message.id)
        if outcome.exc_type == "builtins.TypeError":
            reason = _arguments_fit(task, message)
            if reason is not None:
                error = InvalidArguments(reason)
                return (failure_outcome(message.id, error), reason, error)
        return (outcome, None, exc.rebuild())
    except TypeError as exc:
        reason = _arguments_fit(task, message)
        if reason is not None:
            error = InvalidArguments(reason)
            return (failure_outcome(message.id, error), reason, error)
        return (failure_outcome(message.id, exc), None, exc)
    except Exception as exc:
        return (failure_outcome(message.id, exc), None, exc)
    finally:
        if token is not None:
            running_task.reset(token)
    return Outcome(message.id, States.SUCCESS, value, date_done=time.time()), None, None


def encode_or_fail(app: App, outcome: Outcome) -> tuple[bytes, Outcome, str | None]:
    """Encode an outcome: (bytes, the outcome they record, why the message is bad or None).

    An unencodable result becomes a FAILURE saying so; the recorded outcome is that FAILURE, so
    the log line names the real error rather than the SUCCESS that could not be kept.
    """
    try:
        return app.codec.encode_outcome(outcome), outcome, None
    except SerializationError as exc:
        reason = f"result of {outcome.task_id} cannot be serialized: {exc}"
        failure = failure_outcome(outcome.task_id, SerializationError(reason))
        return app.codec.encode_outcome(failure), failure, reason
