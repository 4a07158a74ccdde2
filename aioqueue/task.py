"""Typed task handles: ``Task[P, R]``, send options, and signatures.

``@app.task`` turns ``async def add(x: int, y: int) -> int`` into a ``Task[[int, int], int]``:
``await add.send(2, 3)`` type-checks its arguments against the function and returns an
``AsyncResult[int]``. Options for the send itself live in ``add.options(...)`` so they never
collide with the task's own keyword arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, TypeAlias, TypeVar

from .errors import ConfigurationError
from .message import MAX_RESULT_TTL, MAX_UNIX_TIME, is_valid_ttl
from .result import AsyncResult, EagerResult

if TYPE_CHECKING:
    from .app import App

__all__ = [
    "MAX_DELAY",
    "Executor",
    "SendOptions",
    "Signature",
    "Task",
    "TaskOptions",
    "check_result_ttl",
    "check_time_limits",
    "send_times",
]

P = ParamSpec("P")
R = TypeVar("R")

Executor = Literal["async", "thread", "process"]
EXECUTORS: tuple[str, ...] = ("async", "thread", "process")


@dataclass(frozen=True, slots=True)
class SendOptions:
    """How one message is sent; everything here is optional and validated at ``options()``."""

    task_id: str | None = None
    queue: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    result_ttl: float | None = None
    parent_id: str | None = None
    root_id: str | None = None
    countdown: float | None = None
    """Seconds from the send to the earliest run (counted when the message is built)."""
    eta: datetime | None = None
    """Earliest run, a timezone-aware datetime (not with countdown)."""
    expires: float | datetime | None = None
    """Seconds after the send, or an aware datetime, after which the task is revoked unrun."""
    timeout: float | None = None
    """Hard time limit in seconds for this run (overrides the task's)."""
    soft_timeout: float | None = None
    """Soft time limit in seconds for this run, async tasks only (overrides the task's)."""


_SEND_OPTION_NAMES = frozenset(SendOptions.__dataclass_fields__)
MAX_DELAY = MAX_RESULT_TTL
"""Longest countdown or relative expires (ten years): the sum with the send time then stays far
inside the envelope's unix-time bound, so a worker never refuses the message we built."""


def check_result_ttl(value: Any, what: str = "result_ttl") -> float:
    """The TTL as a float, or ConfigurationError naming the value: 0 < ttl <= 10 years.

    Checked where it is set, so a TTL a backend would refuse (Redis rejects a huge PX) never
    reaches a worker, which could then not store the outcome.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        ttl = float(value)
        if is_valid_ttl(ttl):
            return ttl
    raise ConfigurationError(
        f"{what} must be a number of seconds above 0 and at most {MAX_RESULT_TTL:.0f} "
        f"(ten years), not {value!r}"
    )


def _check_limit(what: str, value: Any) -> float:
    """A time limit as a float: a finite number of seconds above 0, at most MAX_DELAY."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
        if 0 < seconds <= MAX_DELAY:  # False for NaN and the infinities
            return seconds
    raise ConfigurationError(
        f"{what} must be a finite number of seconds above 0 and at most {MAX_DELAY:.0f} "
        f"(ten years), not {value!r}"
    )


def check_time_limits(
    where: str, timeout: Any, soft_timeout: Any, executor: Executor | None
) -> tuple[float | None, float | None]:
    """(timeout, soft_timeout) as floats, or ConfigurationError naming the bad value.

    The soft limit must fall before the hard one, and only an async task can be warned: a
    thread cannot be interrupted and a child process is only ever killed, so a soft limit on
    them would be accepted and ignored; it is refused instead. ``executor`` None: not known.
    """
    hard = None if timeout is None else _check_limit(f"timeout of {where}", timeout)
    soft = None if soft_timeout is None else _check_limit(f"soft_timeout of {where}", soft_timeout)
    if soft is not None and executor not in (None, "async"):
        raise ConfigurationError(
            f"soft_timeout of {where} ({soft!r}) applies to async tasks only: a {executor} "
            "task cannot be interrupted to clean up; use timeout (the hard limit) instead"
        )
    if soft is not None and hard is not None and soft >= hard:
        raise ConfigurationError(
            f"soft_timeout of {where} ({soft!r}) must be below its timeout ({hard!r}): the "
            "soft limit warns the task before the hard one stops it"
        )
    return hard, soft


def _check_send_options(options: dict[str, Any]) -> dict[str, Any]:
    for name in ("task_id", "queue", "parent_id", "root_id"):
        value = options.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigurationError(
                f"send option {name} must be a non-empty string, not {value!r}"
            )
    headers = options.get("headers")
    if headers is not None and not isinstance(headers, Mapping):
        kind = type(headers).__name__  # not the value: misplaced headers may hold a token
        raise ConfigurationError(f"send option headers must be a mapping, not a {kind}")
    if options.get("result_ttl") is not None:
        options["result_ttl"] = check_result_ttl(options["result_ttl"], "send option result_ttl")
    if options.get("countdown") is not None:
        options["countdown"] = _check_seconds("countdown", options["countdown"], allow_zero=True)
    if options.get("eta") is not None:
        _check_datetime("eta", options["eta"], "; for a delay in seconds use countdown")
    expires = options.get("expires")
    if isinstance(expires, datetime):
        _check_datetime("expires", expires, "")
    elif expires is not None:
        options["expires"] = _check_seconds("expires", expires, allow_zero=False)
    return options


def _check_seconds(name: str, value: Any, *, allow_zero: bool) -> float:
    """A duration as a float: a finite number, not a bool, up to MAX_DELAY (NaN fails too)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
        low_ok = seconds >= 0 if allow_zero else seconds > 0  # both False for NaN
        if low_ok and seconds <= MAX_DELAY:
            return seconds
    floor = "at least 0" if allow_zero else "above 0"
    also = "" if allow_zero else " or a timezone-aware datetime"
    raise ConfigurationError(
        f"send option {name} must be a number of seconds {floor} and at most "
        f"{MAX_DELAY:.0f} (ten years){also}, not {value!r}"
    )


def _check_datetime(name: str, value: Any, hint: str) -> None:
    """An aware datetime a message can carry; a naive one is refused (whose clock would it be?)."""
    if not isinstance(value, datetime):
        raise ConfigurationError(
            f"send option {name} must be a timezone-aware datetime{hint}, not {value!r}"
        )
    if value.utcoffset() is None:
        raise ConfigurationError(
            f"send option {name} must be timezone-aware (a naive datetime has no agreed "
            f"clock; use datetime.now(timezone.utc) or attach a tzinfo), not {value!r}"
        )
    if value.timestamp() > MAX_UNIX_TIME:
        raise ConfigurationError(f"send option {name} is after the year 9999: {value!r}")


def send_times(options: SendOptions, now: float) -> tuple[float | None, float | None]:
    """The message's (eta, expires) as unix times, for a message built at ``now``.

    Times before 1970 become 0 (long past either way), which the envelope accepts.
    """
    eta: float | None = None
    if options.countdown is not None:
        eta = now + options.countdown
    elif options.eta is not None:
        eta = max(0.0, options.eta.timestamp())
    expires = options.expires
    if expires is None:
        return eta, None
    if isinstance(expires, datetime):
        return eta, max(0.0, expires.timestamp())
    return eta, now + expires


def make_send_options(
    base: SendOptions, options: dict[str, Any], task: Task[Any, Any] | None = None
) -> SendOptions:
    """``base`` with ``options`` applied, each checked here: before any I/O, at ``options()``.

    ``task``, when known, checks the time limits against it (its executor, its hard limit).
    """
    unknown = set(options) - _SEND_OPTION_NAMES
    if unknown:
        raise ConfigurationError(
            f"unknown send option(s) {sorted(unknown)}; known: {sorted(_SEND_OPTION_NAMES)}"
        )
    options = _check_send_options(dict(options))
    if "headers" in options:
        options["headers"] = {**base.headers, **(options["headers"] or {})}
    merged = replace(base, **options)
    if merged.countdown is not None and merged.eta is not None:
        raise ConfigurationError(
            f"send options countdown ({merged.countdown!r}) and eta ({merged.eta!r}) both say "
            "when to run: give one (set the other to None to clear it)"
        )
    if "timeout" in options or "soft_timeout" in options:
        merged = _with_limits(merged, task)
    return merged


def _with_limits(merged: SendOptions, task: Task[Any, Any] | None) -> SendOptions:
    """The send options' limits checked together and, when known, against the task."""
    executor = task.executor if task is not None else None
    where = f"send options for {task.name!r}" if task is not None else "send options"
    hard, soft = check_time_limits(where, merged.timeout, merged.soft_timeout, executor)
    if soft is not None and hard is None and task is not None and task.timeout is not None:
        check_time_limits(where, task.timeout, soft, executor)  # before the task's own limit
    return replace(merged, timeout=hard, soft_timeout=soft)


def is_async_callable(fn: Any) -> bool:
    """True for coroutine functions, also behind ``functools.partial`` and ``__call__``."""
    while isinstance(fn, partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    )


def _choose_executor(name: str, fn: Callable[..., Any], executor: Executor | None) -> Executor:
    """Decided once, at registration: coroutine functions await on the loop, the rest offload.

    A plain function on the event loop would block every other task and the heartbeat, then
    fail when its return value is awaited; so ``None`` means "thread" for it, and asking for
    "async" is refused.
    """
    if executor is not None and executor not in EXECUTORS:
        raise ConfigurationError(f"executor must be one of {EXECUTORS}, not {executor!r}")
    if is_async_callable(fn):
        if executor not in (None, "async"):
            raise ConfigurationError(
                f"task {name!r} is a coroutine function; executor={executor!r} is for sync "
                "functions (an async task already runs on the worker's event loop)"
            )
        return "async"
    if executor == "async":
        raise ConfigurationError(
            f"task {name!r} is a plain function: it would block the worker's event loop. Use "
            'executor="thread" (the default for plain functions) or executor="process"; if it '
            "returns an awaitable, make it an async def or mark it with "
            "inspect.markcoroutinefunction"
        )
    return executor or "thread"


def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    """The signature with string annotations resolved where possible, for readable errors."""
    try:
        return inspect.signature(fn, eval_str=True)
    except Exception:
        return inspect.signature(fn)


class Task(Generic[P, R]):
    """A registered task. Call it to run the function here; ``send`` it to run it on a worker."""

    def __init__(
        self,
        app: App,
        fn: Callable[P, Any],
        *,
        name: str,
        queue: str | None,
        executor: Executor | None,
        result_ttl: float | None,
        track_started: bool | None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        soft_timeout: float | None = None,
    ) -> None:
        self.executor: Executor = _choose_executor(name, fn, executor)
        self.timeout, self.soft_timeout = check_time_limits(
            repr(name), timeout, soft_timeout, self.executor
        )
        """Hard and soft time limits in seconds (None: none); a send may override them."""
        if max_attempts is not None and (
            isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1
        ):
            raise ConfigurationError(
                f"max_attempts of {name!r} must be a whole number of at least 1, "
                f"not {max_attempts!r}"
            )
        self.max_attempts = max_attempts
        """Deliveries of one message before it is dead-lettered (None: the app's setting)."""
        self.app = app
        self.fn = fn
        self.name = name
        self.queue = queue
        self.result_ttl = (
            None if result_ttl is None else check_result_ttl(result_ttl, f"result_ttl of {name!r}")
        )
        self.track_started = track_started
        self.signature = _signature(fn)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Run the function here and now, as if it were not a task (await it if it is async)."""
        return self.fn(*args, **kwargs)

    async def send(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """Publish one message (one network round trip) and return a handle on its result."""
        return await self.app.send_message(self, args, kwargs, None)

    async def send_many(self, calls: Iterable[Call[P, R]]) -> list[AsyncResult[R]]:
        """Publish many messages in one round trip; items are args tuples or ``task.s(...)``."""
        return await self.app.send_batch(self, calls, None)

    def options(self, **options: Any) -> TaskOptions[P, R]:
        """Send options: task_id, queue, headers, result_ttl, parent_id, root_id, countdown,
        eta, expires, timeout, soft_timeout. Each is checked here, so a bad value fails before
        any I/O."""
        return TaskOptions(self, make_send_options(SendOptions(), options, self))

    def s(self, *args: P.args, **kwargs: P.kwargs) -> Signature[P, R]:
        """A signature: this task with arguments bound, to send later or in a batch."""
        return Signature(self, args, kwargs, SendOptions())

    async def apply(self, *args: P.args, **kwargs: P.kwargs) -> EagerResult[R]:
        """Run the task here through the worker's execution path: states, errors, no broker."""
        return await self.app.apply_task(self, args, kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name} executor={self.executor} queue={self.queue!r}>"


class TaskOptions(Generic[P, R]):
    """A task with send options bound: ``add.options(queue="high").send(2, 3)``."""

    __slots__ = ("_options", "task")

    def __init__(self, task: Task[P, R], options: SendOptions) -> None:
        self.task = task
        self._options = options

    def options(self, **options: Any) -> TaskOptions[P, R]:
        return TaskOptions(self.task, make_send_options(self._options, options, self.task))

    async def send(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        return await self.task.app.send_message(self.task, args, kwargs, self._options)

    async def send_many(self, calls: Iterable[Call[P, R]]) -> list[AsyncResult[R]]:
        return await self.task.app.send_batch(self.task, calls, self._options)

    def s(self, *args: P.args, **kwargs: P.kwargs) -> Signature[P, R]:
        return Signature(self.task, args, kwargs, self._options)

    async def apply(self, *args: P.args, **kwargs: P.kwargs) -> EagerResult[R]:
        """Run here now (countdown and eta are ignored); an already expired task is REVOKED."""
        return await self.task.app.apply_task(self.task, args, kwargs, self._options)


class Signature(Generic[P, R]):
    """A task with its arguments (and send options) bound, not yet sent."""

    __slots__ = ("args", "kwargs", "options", "task")

    def __init__(
        self,
        task: Task[P, R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: SendOptions,
    ) -> None:
        self.task = task
        self.args = args
        self.kwargs = kwargs
        self.options = options

    def set(self, **options: Any) -> Signature[P, R]:
        """A copy with more send options."""
        options_ = make_send_options(self.options, options, self.task)
        return Signature(self.task, self.args, self.kwargs, options_)

    async def send(self) -> AsyncResult[R]:
        return await self.task.app.send_message(self.task, self.args, self.kwargs, self.options)

    def __repr__(self) -> str:
        return f"<Signature {self.task.name}{self.args!r} {self.kwargs!r}>"


Call: TypeAlias = "tuple[Any, ...] | Signature[P, R]"
