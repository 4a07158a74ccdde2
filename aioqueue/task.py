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
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, TypeAlias, TypeVar, overload

from .context import Context
from .errors import ConfigurationError
from .limits import check_concurrency_limit, parse_rate
from .masking import sensitive_params
from .message import MAX_PRIORITY, MAX_RESULT_TTL, MAX_UNIX_TIME, is_valid_ttl, new_task_id
from .result import AsyncResult, EagerResult
from .retries import RetryPolicy
from .typed import ArgumentPlan, Convert, plan_arguments, plan_result
from .uniqueness import check_flag, check_unique_for

if TYPE_CHECKING:
    from .app import App
    from .canvas.nodes import Chain, Group, Tail
    from .canvas.results import GroupResult
    from .sync import SyncResult

__all__ = [
    "MAX_DELAY",
    "Executor",
    "SendOptions",
    "Signature",
    "Task",
    "TaskOptions",
    "check_priority",
    "check_result_ttl",
    "check_time_limits",
    "send_times",
]

P = ParamSpec("P")
R = TypeVar("R")
R2 = TypeVar("R2")
H2 = TypeVar("H2")

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
    ignore_result: bool | None = None
    """True: the worker stores and pushes no outcome; ``get()`` raises ResultIgnored."""
    unique_for: float | None = None
    """Seconds during which a send with the same arguments returns this one's handle."""
    priority: int | None = None
    """0 (lowest) to 9 (most urgent); overrides a route's and the task's priority."""
    link: tuple[Any, ...] | None = None
    """Signatures sent with this task's result when it succeeds (see :mod:`aioqueue.canvas`)."""
    link_error: tuple[Any, ...] | None = None
    """Signatures sent with ``(task_id, ErrorInfo)`` when it fails for good or is revoked."""


_SEND_OPTION_NAMES = frozenset(SendOptions.__dataclass_fields__)
NO_SEND_OPTIONS = SendOptions()
"""No option set (frozen, so shared): what most signatures carry."""
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


def check_priority(value: Any, what: str) -> int:
    """A message priority: a whole number from 0 to 9 (higher runs first), or
    ConfigurationError naming the value. Booleans are refused: ``True`` is no priority."""
    if type(value) is int and 0 <= value <= MAX_PRIORITY:
        return value
    raise ConfigurationError(
        f"{what} must be a whole number from 0 (lowest) to {MAX_PRIORITY} (most urgent), "
        f"not {value!r}"
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
    _check_uniqueness_options(options)
    if options.get("priority") is not None:
        check_priority(options["priority"], "send option priority")
    _check_link_options(options)
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


def _check_link_options(options: dict[str, Any]) -> None:
    for name in ("link", "link_error"):
        if options.get(name) is not None:
            options[name] = _check_links(name, options[name])


def _check_links(name: str, value: Any) -> tuple[Any, ...]:
    """One signature or a list of them, as a tuple; anything else is refused by name."""
    links = tuple(value) if isinstance(value, list | tuple) else (value,)
    for link in links:
        if not isinstance(link, Signature):
            raise ConfigurationError(
                f"send option {name} takes a signature (task.s(...)) or a list of them, "
                f"not {link!r}"
            )
    return links


def _check_uniqueness_options(options: dict[str, Any]) -> None:
    if options.get("ignore_result") is not None:
        check_flag(options["ignore_result"], "send option ignore_result")
    if options.get("unique_for") is not None:
        options["unique_for"] = check_unique_for(options["unique_for"], "send options")


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


def _task_defaults(
    name: str, unique_for: float | None, ignore_result: bool | None
) -> SendOptions | None:
    """The task's own ``unique_for`` / ``ignore_result`` as send options, checked here."""
    if unique_for is None and ignore_result is None:
        return None
    if unique_for is not None:
        unique_for = check_unique_for(unique_for, repr(name))
    if ignore_result is not None:
        check_flag(ignore_result, f"ignore_result of {name!r}")
    return SendOptions(unique_for=unique_for, ignore_result=ignore_result)


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


def _signature(name: str, fn: Callable[..., Any], bind: bool) -> inspect.Signature:
    """The signature senders must match, string annotations resolved where possible (for
    readable errors); for a bound task, without the context parameter the worker supplies."""
    try:
        signature = inspect.signature(fn, eval_str=True)
    except Exception:
        signature = inspect.signature(fn)
    if not bind:
        return signature
    parameters = list(signature.parameters.values())
    if not parameters or parameters[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise ConfigurationError(
            f"task {name!r} has bind=True, so its first parameter must take the Context "
            f"(def {getattr(fn, '__name__', 'task')}(ctx, ...)); its signature is {signature}"
        )
    return signature.replace(parameters=parameters[1:])


_HOOKS = ("on_success", "on_failure", "on_retry", "after_return")


class Task(Generic[P, R]):
    """A registered task. Call it to run the function here; ``send`` it to run it on a worker.

    Subclass it to give tasks Celery's hooks (``@app.task(base=Audited)``): ``on_success``,
    ``on_failure``, ``on_retry`` and ``after_return``, sync or async. They run on the worker
    after the task and before its outcome is stored; one that raises is logged and changes
    nothing. ``einfo`` is the formatted traceback (a string).
    """

    def __init__(
        self,
        app: App,
        fn: Callable[..., Any],
        *,
        name: str,
        queue: str | None,
        executor: Executor | None,
        result_ttl: float | None,
        track_started: bool | None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        soft_timeout: float | None = None,
        bind: bool = False,
        retry: RetryPolicy | None = None,
        unique_for: float | None = None,
        ignore_result: bool | None = None,
        priority: int | None = None,
        rate_limit: str | None = None,
        concurrency_limit: int | None = None,
        sensitive: tuple[str, ...] = (),
    ) -> None:
        if not isinstance(bind, bool):
            raise ConfigurationError(f"bind of {name!r} must be True or False, not {bind!r}")
        self.defaults = _task_defaults(name, unique_for, ignore_result)
        """Send options every send of this task starts from (None: none, the usual case)."""
        self.executor: Executor = _choose_executor(name, fn, executor)
        self.priority = (
            None if priority is None else check_priority(priority, f"priority of {name!r}")
        )
        """Default message priority (None: the route's, else none); a send may override it."""
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
        self.rate_limit = (
            None if rate_limit is None else parse_rate(rate_limit, f"rate_limit of {name!r}")
        )
        """Starts allowed across all workers (None: unlimited); see aioqueue.limits."""
        self.concurrency_limit = (
            None
            if concurrency_limit is None
            else check_concurrency_limit(concurrency_limit, f"concurrency_limit of {name!r}")
        )
        """Runs at once across all workers (None: unlimited)."""
        self.app = app
        self.fn = fn
        self.name = name
        self.queue = queue
        self.result_ttl = (
            None if result_ttl is None else check_result_ttl(result_ttl, f"result_ttl of {name!r}")
        )
        self.track_started = track_started
        self.bind = bind
        """True: the function takes a :class:`~aioqueue.Context` first (``bind=True``)."""
        self.retry_policy = retry if retry is not None else RetryPolicy()
        self.hooks = tuple(h for h in _HOOKS if getattr(type(self), h) is not getattr(Task, h))
        """The Celery-style hooks this task's class overrides (only those are called)."""
        self.signature = _signature(name, fn, bind)
        self.arguments: ArgumentPlan | None = plan_arguments(fn, self.signature)
        """How the worker rebuilds typed arguments (models, datetimes, ...); None when every
        hint is plain JSON, which then costs nothing (see :mod:`aioqueue.typed`)."""
        self.result_type: Convert | None = plan_result(fn)
        """How a result is rebuilt from the return annotation when read; None: as decoded."""
        self.sensitive, self.secret_params = sensitive_params(fn, sensitive, repr(name))
        """Parameters masked in logs and stored failures (see :mod:`aioqueue.masking`); the
        second set, those annotated ``Secret[...]``, reach the function wrapped."""
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    @property
    def max_retries(self) -> int | None:
        return self.retry_policy.max_retries

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Run the function here and now, as if it were not a task (await it if it is async).

        A bound task gets an eager Context with a fresh id.
        """
        if self.bind:
            ctx = Context(
                id=new_task_id(),
                name=self.name,
                queue=self.queue or self.app.conf.default_queue,
                args=args,
                kwargs=kwargs,
                is_eager=True,
            )
            return self.fn(ctx, *args, **kwargs)
        return self.fn(*args, **kwargs)

    # -- hooks (override in a base class; see the class docstring) ----------------------

    def on_success(
        self, retval: Any, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """The task returned ``retval``."""

    def on_failure(
        self,
        exc: BaseException,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        einfo: str | None,
    ) -> Any:
        """The task failed for good (no retry follows) with ``exc``."""

    def on_retry(
        self,
        exc: BaseException,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        einfo: str | None,
    ) -> Any:
        """The task failed with ``exc`` and will run again."""

    def after_return(
        self,
        status: str,
        retval: Any,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        einfo: str | None,
    ) -> Any:
        """After any outcome: ``status`` SUCCESS, FAILURE or RETRY; ``retval`` the result or
        the exception."""

    async def send(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """Publish one message (one network round trip) and return a handle on its result."""
        return await self.app.send_message(self, args, kwargs, self.defaults)

    async def send_many(self, calls: Iterable[Call[P, R]]) -> list[AsyncResult[R]]:
        """Publish many messages in one round trip; items are args tuples or ``task.s(...)``."""
        return await self.app.send_batch(self, calls, self.defaults)

    def send_sync(self, *args: P.args, **kwargs: P.kwargs) -> SyncResult[R]:
        """:meth:`send` from sync code (Django, Flask, scripts): blocks until published."""
        from .sync import send_sync

        what = f"{self.name}.send_sync()"
        return send_sync(self.app, what, "send_message", self, args, kwargs, self.defaults)

    def send_many_sync(self, calls: Iterable[Call[P, R]]) -> list[SyncResult[R]]:
        """:meth:`send_many` from sync code."""
        from .sync import send_many_sync

        what = f"{self.name}.send_many_sync()"
        return send_many_sync(self.app, what, "send_batch", self, calls, self.defaults)

    def send_on_commit(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Django: send once the current transaction (default database) commits, nothing on
        rollback; :func:`aioqueue.contrib.django.send_on_commit` takes ``using=``/``robust=``."""
        from .contrib.django import send_on_commit

        send_on_commit(self.s(*args, **kwargs))

    def options(self, **options: Any) -> TaskOptions[P, R]:
        """Send options: task_id, queue, headers, result_ttl, parent_id, root_id, countdown,
        eta, expires, timeout, soft_timeout, ignore_result, unique_for, priority. Each is checked
        here, so a bad value fails before any I/O."""
        return TaskOptions(self, make_send_options(self.defaults or SendOptions(), options, self))

    def s(self, *args: Any, **kwargs: Any) -> Signature[P, R]:
        """A signature: this task with arguments bound, to send later or in a batch.

        The arguments may be partial: in a chain the previous step's result comes first.
        """
        return Signature(self, args, kwargs, self.defaults or NO_SEND_OPTIONS)

    def si(self, *args: Any, **kwargs: Any) -> Signature[..., R]:
        """An immutable signature: a chain does not pass the previous result to it."""
        return Signature(self, args, kwargs, self.defaults or NO_SEND_OPTIONS, immutable=True)

    def map(self, items: Iterable[Any] | None = None) -> Signature[Any, list[R]]:
        """One message that calls this task once per item, in order; its result is the list
        of results. Without ``items`` (in a chain) the previous step's result is the items."""
        from .canvas.mapping import STARMAP, starmap_items

        if items is None:
            return self._builtin(STARMAP, (self.name, False), immutable=False)
        return self._builtin(STARMAP, (starmap_items(items, star=False), self.name, False))

    def starmap(self, items: Iterable[Iterable[Any]] | None = None) -> Signature[Any, list[R]]:
        """:meth:`map` with each item a tuple of positional arguments: ``add.starmap([(1, 2)])``."""
        from .canvas.mapping import STARMAP, starmap_items

        if items is None:
            return self._builtin(STARMAP, (self.name, True), immutable=False)
        return self._builtin(STARMAP, (starmap_items(items, star=True), self.name, True))

    def chunks(self, items: Iterable[Iterable[Any]], size: int) -> Group[list[list[R]]]:
        """A group of :meth:`starmap` messages of ``size`` calls each (the last may be
        shorter): its result is one list of results per chunk."""
        from .canvas.mapping import STARMAP, chunk_calls
        from .canvas.nodes import Group

        parts = chunk_calls(items, size)
        return Group([self._builtin(STARMAP, (part, self.name, True)) for part in parts])

    def _builtin(
        self, name: str, args: tuple[Any, ...], *, immutable: bool = True
    ) -> Signature[Any, Any]:
        sig: Signature[Any, Any] = Signature(
            None, args, {}, NO_SEND_OPTIONS, name=name, app=self.app, immutable=immutable
        )
        sig.queue, sig.priority = self.queue, self.priority
        return sig

    async def apply(self, *args: P.args, **kwargs: P.kwargs) -> EagerResult[R]:
        """Run the task here through the worker's execution path: states, errors, no broker."""
        return await self.app.apply_task(self, args, kwargs, self.defaults)

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
        if self._options.link is not None or self._options.link_error is not None:
            return await Signature(self.task, args, kwargs, self._options).send()
        return await self.task.app.send_message(self.task, args, kwargs, self._options)

    async def send_many(self, calls: Iterable[Call[P, R]]) -> list[AsyncResult[R]]:
        if self._options.link is not None or self._options.link_error is not None:
            raise ConfigurationError(
                "send_many does not take link / link_error: send a group of signatures, "
                "each with .set(link=...)"
            )
        return await self.task.app.send_batch(self.task, calls, self._options)

    def send_sync(self, *args: P.args, **kwargs: P.kwargs) -> SyncResult[R]:
        from .sync import send_sync

        app, what = self.task.app, f"{self.task.name}.send_sync()"
        return send_sync(app, what, "send_message", self.task, args, kwargs, self._options)

    def send_many_sync(self, calls: Iterable[Call[P, R]]) -> list[SyncResult[R]]:
        from .sync import send_many_sync

        app, what = self.task.app, f"{self.task.name}.send_many_sync()"
        return send_many_sync(app, what, "send_batch", self.task, calls, self._options)

    def send_on_commit(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """:meth:`Task.send_on_commit` with these options."""
        from .contrib.django import send_on_commit

        send_on_commit(self.s(*args, **kwargs))

    def s(self, *args: Any, **kwargs: Any) -> Signature[P, R]:
        return Signature(self.task, args, kwargs, self._options)

    def si(self, *args: Any, **kwargs: Any) -> Signature[..., R]:
        return Signature(self.task, args, kwargs, self._options, immutable=True)

    async def apply(self, *args: P.args, **kwargs: P.kwargs) -> EagerResult[R]:
        """Run here now (countdown and eta are ignored); an already expired task is REVOKED."""
        return await self.task.app.apply_task(self.task, args, kwargs, self._options)


class Signature(Generic[P, R]):
    """A task with its arguments (and send options) bound, not yet sent: plain data.

    ``immutable`` (``task.si()``): a chain does not pass the previous result to it. ``task``
    is None for a signature made by name (``app.signature``) of a task this process does not
    register; ``name``, ``queue`` and ``priority`` are what a send needs either way. A chain,
    group or chord carries signatures in its messages (see :mod:`aioqueue.canvas`), so a
    worker can send one it received.
    """

    __slots__ = (
        "app",
        "args",
        "immutable",
        "kwargs",
        "name",
        "options",
        "priority",
        "queue",
        "task",
    )

    def __init__(
        self,
        task: Task[P, R] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: SendOptions,
        *,
        immutable: bool = False,
        name: str | None = None,
        app: App | None = None,
    ) -> None:
        self.task: Task[P, R] = task  # type: ignore[assignment] # None only for app.signature
        self.args = args
        self.kwargs = kwargs
        self.options = options
        self.immutable = immutable
        if task is not None:
            self.name, self.queue, self.priority, self.app = (
                task.name,
                task.queue,
                task.priority,
                task.app,
            )
        else:
            assert name is not None and app is not None
            self.name, self.queue, self.priority, self.app = name, None, None, app

    def set(self, **options: Any) -> Signature[P, R]:
        """A copy with more send options."""
        options_ = make_send_options(self.options, options, self.task)
        return self._copy(options=options_)

    def _copy(self, **changes: Any) -> Signature[P, R]:
        fields: dict[str, Any] = {
            "args": self.args,
            "kwargs": self.kwargs,
            "options": self.options,
            "immutable": self.immutable,
        }
        fields.update(changes)
        return Signature(
            self.task,
            fields["args"],
            fields["kwargs"],
            fields["options"],
            immutable=fields["immutable"],
            name=self.name,
            app=self.app,
        )

    async def send(self) -> AsyncResult[R]:
        if self.options.link is not None or self.options.link_error is not None:
            from .canvas.send import send_node

            sent: AsyncResult[R] = await send_node(self.app, self)
            return sent
        return await self.app._send(
            self.name, self.queue, self.args, self.kwargs, self.options, self.priority
        )

    @overload
    def __or__(self, other: Group[R2]) -> Chain[R2, GroupResult[R2]]: ...
    @overload
    def __or__(self, other: Chain[R2, H2]) -> Chain[R2, H2]: ...
    @overload
    def __or__(self, other: Tail[R, R2]) -> Chain[R2]: ...
    def __or__(self, other: Any) -> Any:
        """``a.s() | b.s()``: a chain (typed like :func:`~aioqueue.chain`)."""
        from .canvas.nodes import pipe

        return pipe(self, other)

    def __repr__(self) -> str:
        mark = "i" if self.immutable else ""
        return f"<Signature{mark} {self.name}{self.args!r} {self.kwargs!r}>"


Call: TypeAlias = "tuple[Any, ...] | Signature[P, R]"
