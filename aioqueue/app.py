"""The App: configuration, the task registry, and the sending side.

An App registers tasks and sends messages; it does not consume (that is the Worker) and it does
not read results itself (that is AsyncResult). Each App has its own registry: there is no global
one, so two apps in one process never see each other's tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, TypeVar, overload

from .backends.base import ClaimsTaskIds, ListensForReplies
from .brokers.base import Outgoing
from .config import Config, mask_url
from .connections import build_backend, build_broker
from .context import Context
from .control import Control
from .errors import ConfigurationError, TaskNotRegistered
from .events import sent_events_written
from .hooks import Middleware, call_hook, overrides
from .message import Message, MessageCodec, Outcome, new_task_id
from .result import AsyncResult, EagerResult
from .retries import DEFAULT_MAX_RETRIES, RetryPolicy
from .routing import Destination, Router, check_routes
from .signing import signer_from
from .task import (
    Executor,
    SendOptions,
    Signature,
    Task,
    check_result_ttl,
    make_send_options,
    send_times,
)
from .uniqueness import claim_for, claim_ttl_at_send, claims

if TYPE_CHECKING:
    from datetime import timedelta

    from .backends.base import ResultBackend
    from .brokers.base import Broker
    from .events import EventFeed
    from .periodic.entries import Entry as PeriodicEntry
    from .periodic.schedules import Schedule
    from .sync import SyncResult
    from .worker import Worker

__all__ = ["App", "task_name_for"]

_BUILDING = threading.RLock()
"""Held while a broker or backend is built from its URL (lazily, on first use)."""

P = ParamSpec("P")
R = TypeVar("R")

_NO_OPTIONS = SendOptions()


def _main_module_name(module_name: str) -> str:
    """The importable name of a module run as a script, so client and worker agree on names."""
    if module_name not in ("__main__", "__mp_main__"):
        return module_name
    main = sys.modules.get(module_name)
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and not spec.name.endswith("__main__"):
        return str(spec.name)
    path = getattr(main, "__file__", None)
    if path is None:
        return module_name  # an interactive session: there is nothing better to call it
    return Path(path).stem


def task_name_for(fn: Callable[..., Any]) -> str:
    """Default task name: ``module.qualname`` with ``__main__`` resolved to the real module."""
    return f"{_main_module_name(fn.__module__)}.{fn.__qualname__}"


class App:
    """Configuration, task registry and sender. ``async with app:`` connects and closes it."""

    def __init__(
        self,
        name: str = "aioqueue",
        *,
        broker: str | Broker | None = None,
        backend: str | ResultBackend | None = None,
        middleware: Iterable[Middleware] = (),
        **config: Any,
    ) -> None:
        self.name = name
        self.middleware: list[Middleware] = []
        """App-wide hooks, called in order (see :class:`~aioqueue.Middleware`)."""
        for item in middleware:
            self.add_middleware(item)
        self.conf = Config()
        if isinstance(broker, str):
            config["broker_url"] = broker
        if isinstance(backend, str):
            config["result_backend"] = backend
        self.conf.update(config)
        self._router: Router | None = None
        self._check_conf()
        self._broker: Broker | None = None if isinstance(broker, str | None) else broker
        self._backend: ResultBackend | None = None if isinstance(backend, str | None) else backend
        self._own_broker = self._broker is None
        self._own_backend = self._backend is None
        self._tasks: dict[str, Task[Any, Any]] = {}
        self._periodic: dict[str, PeriodicEntry] = {}
        self._codec: MessageCodec | None = None
        self._broker_ready = False
        self._backend_ready = False
        self._connect_lock: asyncio.Lock | None = None
        self._control: Control | None = None
        self.import_path: str | None = None
        """``module:attribute`` that process-pool children import; found on first need."""
        self.clock: Callable[[], float] = time.time
        """The wall clock (unix seconds) sends, workers and retries read for etas, expiry and
        backoff; the pytest plugin swaps in a virtual one (see :mod:`aioqueue.testing`)."""
        self._defined_in = sys._getframe(1).f_globals.get("__name__", "__main__")

    # -- configuration ------------------------------------------------------------------

    def config_from_object(self, obj: object | str) -> None:
        """Apply settings from a module, class, mapping or ``"package.module"`` path."""
        self._ensure_unconnected()
        self.conf.from_object(obj)
        self._check_conf()
        self._codec = None

    def _check_conf(self) -> None:
        """Settings the app itself depends on, checked when set rather than at first use."""
        self.conf.result_ttl = check_result_ttl(self.conf.result_ttl, "setting result_ttl")
        if self.conf.events:
            from .events import EventsMiddleware, events_middleware

            if events_middleware(self) is None:
                self.add_middleware(EventsMiddleware(self))
        self._router = check_routes(self.conf.task_routes)
        if self._router is not None:
            self.conf.task_routes = self._router.source

    def _ensure_unconnected(self) -> None:
        if self._broker_ready or self._backend_ready:
            raise ConfigurationError("configure the app before it connects")

    @property
    def codec(self) -> MessageCodec:
        if self._codec is None:
            self._codec = MessageCodec(
                self.conf.serializer,
                self.conf.accept_content,
                signer=signer_from(self.conf.signing_key),
                limits=self.conf.limits(),
            )
        return self._codec

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            with _BUILDING:  # threads (a worker's, the sync client's) must get one instance
                if self._broker is None:
                    self._broker = build_broker(self.conf.broker_url, self.conf, self.name)
        return self._broker

    @property
    def backend(self) -> ResultBackend:
        if self._backend is None:
            with _BUILDING:
                if self._backend is None:
                    self._backend = build_backend(self._backend_url(), self.conf, self.name)
        return self._backend

    def _backend_url(self) -> str:
        """The configured backend, else the one that goes with the broker.

        A broker instance does not say where results belong (``broker_url`` is not its URL),
        and results kept in this process's memory would silently never reach a worker in
        another one: only a MemoryBroker instance gets a memory backend by default.
        """
        if self.conf.result_backend:
            return self.conf.result_backend
        if self._own_broker:
            return _default_backend_url(self.conf.broker_url)
        from .brokers.memory import MemoryBroker

        if isinstance(self._broker, MemoryBroker):
            return "memory://"
        raise ConfigurationError(
            f"app {self.name!r} was given a broker instance ({type(self._broker).__name__}) "
            "but no result backend: pass backend= (a URL such as 'redis://host/0' or a backend "
            "instance) or set result_backend"
        )

    def add_middleware(self, middleware: Middleware) -> None:
        """Add app-wide hooks; they run after those added before them."""
        if not isinstance(middleware, Middleware):
            raise ConfigurationError(
                f"middleware must be an aioqueue.Middleware instance, not {middleware!r}"
            )
        self.middleware.append(middleware)

    async def _before_send(self, message: Message) -> Message:
        for item in self.middleware:
            if overrides(item, Middleware, "before_send"):
                changed = await call_hook(
                    type(item).__name__, "before_send", item.before_send, message
                )
                if isinstance(changed, Message):
                    message = changed
        return message

    async def _after_send(self, messages: Sequence[Message], error: BaseException | None) -> None:
        for item in self.middleware:
            if overrides(item, Middleware, "after_send"):
                for message in messages:
                    await call_hook(
                        type(item).__name__, "after_send", item.after_send, message, error
                    )

    @contextlib.asynccontextmanager
    async def _sending(self, messages: Sequence[Message]) -> AsyncIterator[None]:
        """Around a publish whose messages went through ``before_send``: ``after_send`` for
        each, with the error if the publish raised (the error goes on)."""
        try:
            yield
        except BaseException as exc:
            await self._after_send(messages, exc)
            raise
        await self._after_send(messages, None)

    # -- registry -----------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    # Listed first so a literal "async" picks it; mypy flags its overlap with the general form
    # below, which is intended: "async" narrows the decorator to coroutine functions.
    @overload
    def task(  # type: ignore[overload-overlap]
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        executor: Literal["async"],
        bind: Literal[False] = False,
        result_ttl: float | None = None,
        track_started: bool | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        soft_timeout: float | None = None,
        base: type[Task[Any, Any]] | None = None,
        max_retries: int | None = DEFAULT_MAX_RETRIES,
        retry_for: tuple[type[Exception], ...] | type[Exception] = (),
        retry_backoff: float | bool = False,
        retry_backoff_max: float = 600.0,
        retry_jitter: bool = True,
        default_retry_delay: float = 180.0,
        unique_for: float | None = None,
        ignore_result: bool | None = None,
        priority: int | None = None,
        rate_limit: str | None = None,
        concurrency_limit: int | None = None,
        sensitive: tuple[str, ...] = (),
    ) -> _AsyncTaskDecorator: ...

    @overload
    def task(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        executor: Executor | None = None,
        bind: Literal[False] = False,
        result_ttl: float | None = None,
        track_started: bool | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        soft_timeout: float | None = None,
        base: type[Task[Any, Any]] | None = None,
        max_retries: int | None = DEFAULT_MAX_RETRIES,
        retry_for: tuple[type[Exception], ...] | type[Exception] = (),
        retry_backoff: float | bool = False,
        retry_backoff_max: float = 600.0,
        retry_jitter: bool = True,
        default_retry_delay: float = 180.0,
        unique_for: float | None = None,
        ignore_result: bool | None = None,
        priority: int | None = None,
        rate_limit: str | None = None,
        concurrency_limit: int | None = None,
        sensitive: tuple[str, ...] = (),
    ) -> _TaskDecorator: ...

    @overload
    def task(  # type: ignore[overload-overlap]
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        executor: Literal["async"],
        bind: Literal[True],
        result_ttl: float | None = None,
        track_started: bool | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        soft_timeout: float | None = None,
        base: type[Task[Any, Any]] | None = None,
        max_retries: int | None = DEFAULT_MAX_RETRIES,
        retry_for: tuple[type[Exception], ...] | type[Exception] = (),
        retry_backoff: float | bool = False,
        retry_backoff_max: float = 600.0,
        retry_jitter: bool = True,
        default_retry_delay: float = 180.0,
        unique_for: float | None = None,
        ignore_result: bool | None = None,
        rate_limit: str | None = None,
        concurrency_limit: int | None = None,
        sensitive: tuple[str, ...] = (),
    ) -> _BoundAsyncTaskDecorator: ...

    @overload
    def task(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        executor: Executor | None = None,
        bind: Literal[True],
        result_ttl: float | None = None,
        track_started: bool | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        soft_timeout: float | None = None,
        base: type[Task[Any, Any]] | None = None,
        max_retries: int | None = DEFAULT_MAX_RETRIES,
        retry_for: tuple[type[Exception], ...] | type[Exception] = (),
        retry_backoff: float | bool = False,
        retry_backoff_max: float = 600.0,
        retry_jitter: bool = True,
        default_retry_delay: float = 180.0,
        unique_for: float | None = None,
        ignore_result: bool | None = None,
        rate_limit: str | None = None,
        concurrency_limit: int | None = None,
        sensitive: tuple[str, ...] = (),
    ) -> _BoundTaskDecorator: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        executor: Executor | None = None,
        bind: bool = False,
        result_ttl: float | None = None,
        track_started: bool | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        soft_timeout: float | None = None,
        base: type[Task[Any, Any]] | None = None,
        max_retries: int | None = DEFAULT_MAX_RETRIES,
        retry_for: tuple[type[Exception], ...] | type[Exception] = (),
        retry_backoff: float | bool = False,
        retry_backoff_max: float = 600.0,
        retry_jitter: bool = True,
        default_retry_delay: float = 180.0,
        unique_for: float | None = None,
        ignore_result: bool | None = None,
        priority: int | None = None,
        rate_limit: str | None = None,
        concurrency_limit: int | None = None,
        sensitive: tuple[str, ...] = (),
    ) -> (
        Task[Any, Any]
        | _TaskDecorator
        | _AsyncTaskDecorator
        | _BoundTaskDecorator
        | _BoundAsyncTaskDecorator
    ):
        """Register a function as a task: ``@app.task`` or ``@app.task(queue="high")``.

        Coroutine functions run on the worker's event loop, plain functions on its thread pool
        unless ``executor="process"``; ``executor="async"`` for a plain function is refused.
        ``timeout`` and ``soft_timeout`` are time limits in seconds (see the README's "Time
        limits"); a soft limit is for async tasks only. ``bind=True`` passes a
        :class:`~aioqueue.Context` first; ``base`` is a :class:`Task` subclass with hooks;
        ``max_retries``, ``retry_for``, ``retry_backoff``, ``retry_backoff_max``,
        ``retry_jitter`` and ``default_retry_delay`` are the retry policy (see "Retries").
        ``unique_for`` (seconds) makes a send with the same arguments return the first one's
        handle, ``ignore_result`` keeps no outcome (see "Uniqueness" and "Ignoring results").
        ``priority``: 0 (lowest) to 9 (most urgent), see "Routing and priorities".
        ``rate_limit`` ("10/m", "5/s", "100/s burst 20") and ``concurrency_limit`` (runs at
        once) hold across all workers, see "Rate limits" and "Concurrency caps".
        ``sensitive``: parameter names masked in logs and stored failures (see "Security").
        """
        task_class = Task if base is None else base
        if not (isinstance(task_class, type) and issubclass(task_class, Task)):
            raise ConfigurationError(f"base must be a subclass of aioqueue.Task, not {base!r}")
        where = repr(name) if name is not None else "a task"
        policy = RetryPolicy.build(
            where,
            max_retries=max_retries,
            retry_for=retry_for,
            retry_backoff=retry_backoff,
            retry_backoff_max=retry_backoff_max,
            retry_jitter=retry_jitter,
            default_retry_delay=default_retry_delay,
        )

        def register(func: Callable[..., Any]) -> Task[Any, Any]:
            task_name = name or task_name_for(func)
            if len(task_name) > self.conf.max_task_name_length:
                raise ConfigurationError(
                    f"task name {task_name[:40]!r}... is {len(task_name)} characters, over "
                    f"max_task_name_length={self.conf.max_task_name_length}: workers refuse it"
                )
            if task_name in self._tasks and self._tasks[task_name].fn is not func:
                existing = self._tasks[task_name].fn
                if task_name_for(existing) != task_name_for(func) or name is not None:
                    raise ConfigurationError(f"a different task is already named {task_name!r}")
            task: Task[Any, Any] = task_class(
                self,
                func,
                name=task_name,
                queue=queue,
                executor=executor,
                result_ttl=result_ttl,
                track_started=track_started,
                max_attempts=max_attempts,
                timeout=timeout,
                soft_timeout=soft_timeout,
                bind=bind,
                retry=policy,
                unique_for=unique_for,
                ignore_result=ignore_result,
                priority=priority,
                rate_limit=rate_limit,
                concurrency_limit=concurrency_limit,
                sensitive=sensitive,
            )
            self._tasks[task_name] = task
            return task

        if fn is not None:
            return register(fn)
        if bind is True:
            if executor == "async":
                return _BoundAsyncTaskDecorator(register)
            return _BoundTaskDecorator(register)
        if executor == "async":
            return _AsyncTaskDecorator(register)
        return _TaskDecorator(register)

    @property
    def tasks(self) -> Mapping[str, Task[Any, Any]]:
        """The registry, read-only: name -> Task."""
        return MappingProxyType(self._tasks)

    def get_task(self, name: str) -> Task[Any, Any]:
        try:
            return self._tasks[name]
        except KeyError:
            raise TaskNotRegistered(
                f"task {name!r} is not registered in app {self.name!r}"
            ) from None

    # -- periodic tasks -----------------------------------------------------------------

    def periodic(
        self,
        *,
        cron: str | None = None,
        every: float | timedelta | None = None,
        tz: str | None = None,
        name: str | None = None,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        missed: Literal["skip", "catch_up"] = "skip",
        catch_up_limit: int | None = None,
        expires: float | None = None,
        **options: Any,
    ) -> Callable[[Task[P, R]], Task[P, R]]:
        """Run a task on a schedule: ``@app.periodic(every=30)`` above ``@app.task``.

        ``cron`` is read in ``tz`` (default: the ``timezone`` setting); ``missed`` says what
        happens to ticks missed while nothing ran; other keywords are send options.
        See the README's "Periodic tasks".
        """
        from .periodic.entries import DEFAULT_CATCH_UP_LIMIT, build_schedule, make_entry

        where = f"@app.periodic({name!r})" if name else "@app.periodic"
        schedule = build_schedule(
            where, cron=cron, every=every, tz=tz, default_tz=self.conf.timezone
        )

        def declare(task: Task[P, R]) -> Task[P, R]:
            if not isinstance(task, Task):
                raise ConfigurationError(
                    f"{where} goes above @app.task (it takes a task, not {task!r})"
                )
            entry = make_entry(
                name=name,
                task=task.name,
                schedule=schedule,
                args=args,
                kwargs=kwargs,
                options=options,
                missed=missed,
                catch_up_limit=(
                    DEFAULT_CATCH_UP_LIMIT if catch_up_limit is None else catch_up_limit
                ),
                expires=expires,
            )
            if entry.name in self._periodic:
                raise ConfigurationError(
                    f"periodic entry {entry.name!r} is declared twice: give each a name="
                )
            self._periodic[entry.name] = entry
            return task

        return declare

    def add_periodic_task(
        self,
        schedule: float | timedelta | Schedule,
        sig: Signature[Any, Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        name: str | None = None,
        **extra: Any,
    ) -> str:
        """Celery's spelling: ``app.add_periodic_task(crontab(hour=7), report.s(), name=...)``.

        Adding a name again replaces its entry. Returns the entry's name.
        """
        from .periodic.entries import entry_from_signature

        entry = entry_from_signature(self, schedule, sig, name, args=args, kwargs=kwargs, **extra)
        self._periodic[entry.name] = entry
        return entry.name

    def periodic_entries(self) -> list[PeriodicEntry]:
        """Every periodic entry: declared in code, then the ``beat_schedule`` setting."""
        from .periodic.entries import collect_entries

        return collect_entries(self._periodic, self)

    # -- connections --------------------------------------------------------------------

    def _lock(self) -> asyncio.Lock:
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        return self._connect_lock

    async def ready_broker(self) -> Broker:
        """The broker, connected (the first call connects; later calls cost nothing)."""
        if not self._broker_ready:
            async with self._lock():
                if not self._broker_ready:
                    await self.broker.connect()
                    self._broker_ready = True
        return self.broker

    async def ready_backend(self) -> ResultBackend:
        """The result backend, connected."""
        if not self._backend_ready:
            async with self._lock():
                if not self._backend_ready:
                    await self.backend.connect()
                    self._backend_ready = True
        return self.backend

    async def connect(self) -> None:
        """Connect broker and backend now, and start listening for results of our sends.

        Call it from a web app's lifespan; without it the first send connects lazily.
        """
        await self.ready_broker()
        backend = await self.ready_backend()
        if isinstance(backend, ListensForReplies):
            await backend.start_listening()

    @property
    def control(self) -> Control:
        """Commands to every worker: ``await app.control.revoke(task_id)``."""
        if self._control is None:
            self._control = Control(self)
        return self._control

    async def close(self) -> None:
        """Close the broker and backend connections (safe to call twice)."""
        if self._control is not None:
            await self._control.aclose()
        if self.conf.events:
            from .events import events_middleware

            events = events_middleware(self)
            if events is not None:
                await events.emitter.aclose()
        broker, backend = self._broker, self._backend
        self._broker_ready = self._backend_ready = False
        if broker is not None:
            await broker.aclose()
        if backend is not None:
            await backend.aclose()
        # Clients are bound to the event loop they ran on: what we built from a URL is built
        # again on next use. Memory transports keep their state (it *is* the queue).
        if self._own_broker and not self.conf.broker_url.startswith("memory"):
            self._broker = None
        if self._own_backend and backend is not None and not backend.url.startswith("memory"):
            self._backend = None

    def forget_connections(self) -> None:
        """Drop the connections without closing them: after ``fork()``, where they belong to
        the parent (closing them would close the parent's). The next use connects anew."""
        self._control = None
        self._broker_ready = self._backend_ready = False
        self._connect_lock = None
        if self._own_broker and not self.conf.broker_url.startswith("memory"):
            self._broker = None
        backend = self._backend
        if self._own_backend and backend is not None and not backend.url.startswith("memory"):
            self._backend = None

    async def __aenter__(self) -> App:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- sending ------------------------------------------------------------------------

    def _build_message(
        self,
        task_name: str,
        queue: str | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: SendOptions,
        reply_to: str | None,
        priority: int | None = None,
        message_id: str | None = None,
    ) -> Message:
        if options.link is not None or options.link_error is not None:
            raise ConfigurationError(
                f"task {task_name!r}: link / link_error go with a single send "
                "(task.options(link=...).send(...) or a signature's send()), not with a batch, "
                "apply() or a periodic entry"
            )
        now = self.clock()
        eta = expires = None
        if options.countdown is not None or options.eta is not None or options.expires is not None:
            eta, expires = send_times(options, now)
        task_id, claim = options.task_id, None
        if task_id is not None or options.unique_for is not None:
            task_id, claim = claim_for(task_name, args, kwargs, task_id, options.unique_for, now)
        if self.conf.task_routes is not None:
            # precedence: send options > route > the task's own (queue=, priority=) > default
            route = self._route(task_name, args, kwargs)
            if route is not None:
                queue = route.queue or queue
                priority = route.priority if route.priority is not None else priority
        if options.priority is not None:
            priority = options.priority
        return Message(
            id=message_id or task_id or new_task_id(),
            task=task_name,
            queue=options.queue or queue or self.conf.default_queue,
            args=args,
            kwargs=kwargs,
            headers=options.headers,
            parent_id=options.parent_id,
            root_id=options.root_id,
            reply_to=reply_to,
            result_ttl=options.result_ttl,
            eta=eta,
            expires=expires,
            sent_at=now,
            timeout=options.timeout,
            soft_timeout=options.soft_timeout,
            priority=priority,
            claim=claim,
            ignore_result=options.ignore_result is True,
        )

    def _route(
        self, task_name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Destination | None:
        router = self._router
        if router is None or router.source is not self.conf.task_routes:
            # app.conf.task_routes was replaced since it was checked: check the new one now
            router = self._router = check_routes(self.conf.task_routes)
            if router is None:
                return None
            self.conf.task_routes = router.source
        return router.route(task_name, args, kwargs)

    async def send_message(
        self,
        task: Task[Any, R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: SendOptions | None,
    ) -> AsyncResult[R]:
        return await self._send(
            task.name, task.queue, args, kwargs, options or _NO_OPTIONS, task.priority
        )

    async def _send(
        self,
        task_name: str,
        queue: str | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: SendOptions,
        priority: int | None = None,
    ) -> AsyncResult[Any]:
        broker = self.broker if self._broker_ready else await self.ready_broker()
        backend = self._backend  # not built yet: nobody here waits, so no reply channel
        reply_to = backend.reply_to() if backend is not None else None
        message = self._build_message(task_name, queue, args, kwargs, options, reply_to, priority)
        if self.middleware:
            message = await self._before_send(message)
            async with self._sending([message]):
                if self.conf.events:
                    await sent_events_written(self)
                return await self._publish(broker, backend, message)
        return await self._publish(broker, backend, message)

    async def _publish(
        self, broker: Broker, backend: ResultBackend | None, message: Message
    ) -> AsyncResult[Any]:
        if message.claim is not None:
            return await self._send_claimed(broker, message)
        await broker.publish(message.queue, self.codec.encode(message), eta=message.eta)
        token = backend.send_token() if backend is not None else None
        task_name = message.task
        return AsyncResult(
            message.id, self, task_name=task_name, token=token, ignored=message.ignore_result
        )

    async def _send_claimed(self, broker: Broker, message: Message) -> AsyncResult[Any]:
        """Claim the message's id, then publish it; a refused claim publishes nothing."""
        body = self.codec.encode(message)  # a message that cannot be sent claims nothing
        backend = claims(self.backend)
        await self.ready_backend()
        if not await backend.claim(message.id, self._claim_ttl(message), fresh=message.claim != 0):
            return self._duplicate(message)
        try:
            await broker.publish(message.queue, body, eta=message.eta)
        except BaseException:
            await _release_quietly(backend, [message.id])
            raise
        return AsyncResult(
            message.id,
            self,
            task_name=message.task,
            token=self.backend.send_token(),
            ignored=message.ignore_result,
        )

    def _claim_ttl(self, message: Message) -> float:
        task = self._tasks.get(message.task)
        task_ttl = task.result_ttl if task is not None else None
        result_ttl = message.result_ttl or task_ttl or self.conf.result_ttl
        return claim_ttl_at_send(message, result_ttl, self.clock())

    def _duplicate(self, message: Message) -> AsyncResult[Any]:
        """The handle on the task that holds the id (sent by anyone, so no send token)."""
        return AsyncResult(message.id, self, task_name=message.task, ignored=message.ignore_result)

    async def _claim_batch(
        self,
        items: list[Outgoing],
        results: list[AsyncResult[R]],
        claimed: list[tuple[int, Message]],
    ) -> tuple[list[Outgoing], list[str]]:
        """Claim the batch's claimed ids at once; drop the items whose claim was refused.

        An id twice in one batch is sent once: the later items get the first one's handle.
        ``results`` is updated in place; returns the items to publish and the ids claimed (to
        release if the publish fails).
        """
        backend = claims(self.backend)
        await self.ready_backend()
        first: dict[str, int] = {}
        dropped: set[int] = set()
        to_claim: list[tuple[int, Message]] = []
        for index, message in claimed:
            if message.id in first:
                results[index] = results[first[message.id]]
                dropped.add(index)
            else:
                first[message.id] = index
                to_claim.append((index, message))
        replies = await asyncio.gather(
            *(backend.claim(m.id, self._claim_ttl(m), fresh=m.claim != 0) for _, m in to_claim),
            return_exceptions=True,
        )
        taken = [m.id for (_, m), ok in zip(to_claim, replies, strict=True) if ok is True]
        failed = next((r for r in replies if isinstance(r, BaseException)), None)
        if failed is not None:
            await _release_quietly(backend, taken)
            raise failed
        for (index, message), ok in zip(to_claim, replies, strict=True):
            if ok is not True:
                results[index] = self._duplicate(message)
                dropped.add(index)
        return [item for i, item in enumerate(items) if i not in dropped], taken

    async def send_batch(
        self,
        task: Task[Any, R],
        calls: Iterable[tuple[Any, ...] | Signature[Any, R]],
        options: SendOptions | None,
    ) -> list[AsyncResult[R]]:
        broker = await self.ready_broker()
        backend = self._backend
        reply_to = backend.reply_to() if backend is not None else None
        token = backend.send_token() if backend is not None else None
        hooked: list[Message] = []  # what before_send saw: after_send sees the same
        if not self.middleware:
            items, results, claimed = await self._batch(task, calls, options, reply_to, token, None)
            return await self._publish_batch(broker, items, results, claimed)
        try:
            items, results, claimed = await self._batch(
                task, calls, options, reply_to, token, hooked
            )
            if self.conf.events:
                await sent_events_written(self)
            sent = await self._publish_batch(broker, items, results, claimed)
        except BaseException as exc:
            await self._after_send(hooked, exc)
            raise
        await self._after_send(hooked, None)
        return sent

    async def _batch(
        self,
        task: Task[Any, R],
        calls: Iterable[tuple[Any, ...] | Signature[Any, R]],
        options: SendOptions | None,
        reply_to: str | None,
        token: Any,
        hooked: list[Message] | None,
    ) -> tuple[list[Outgoing], list[AsyncResult[R]], list[tuple[int, Message]]]:
        """The batch's messages, encoded, with their handles and the claimed ones among them;
        ``hooked`` (with middleware) collects each message as ``before_send`` returned it."""
        items: list[Outgoing] = []
        results: list[AsyncResult[R]] = []
        claimed: list[tuple[int, Message]] = []
        encode = self.codec.encode
        for call in calls:
            if isinstance(call, Signature):
                message = self._build_message(
                    call.name,
                    call.queue,
                    call.args,
                    call.kwargs,
                    call.options,
                    reply_to,
                    call.priority,
                )
            elif isinstance(call, tuple):
                message = self._build_message(
                    task.name, task.queue, call, {}, options or _NO_OPTIONS, reply_to, task.priority
                )
            else:
                raise TypeError(
                    f"send_many takes argument tuples or signatures, not {type(call).__name__}"
                )
            if hooked is not None:
                message = await self._before_send(message)
                hooked.append(message)
            items.append((message.queue, encode(message), message.eta))
            results.append(
                AsyncResult(
                    message.id,
                    self,
                    task_name=message.task,
                    token=token,
                    ignored=message.ignore_result,
                )
            )
            if message.claim is not None:
                claimed.append((len(results) - 1, message))
        return items, results, claimed

    async def _publish_batch(
        self,
        broker: Broker,
        items: list[Outgoing],
        results: list[AsyncResult[R]],
        claimed: list[tuple[int, Message]],
    ) -> list[AsyncResult[R]]:
        if claimed:
            return await self._publish_claimed(broker, items, results, claimed)
        if items:
            await broker.publish_many(items)
        return results

    async def _publish_claimed(
        self,
        broker: Broker,
        items: list[Outgoing],
        results: list[AsyncResult[R]],
        claimed: list[tuple[int, Message]],
    ) -> list[AsyncResult[R]]:
        items, taken = await self._claim_batch(items, results, claimed)
        try:
            if items:
                await broker.publish_many(items)
        except BaseException:
            await _release_quietly(claims(self.backend), taken)
            raise
        return results

    async def send_task(
        self,
        name: str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult[Any]:
        """Send a task by name, from code that cannot import it (it need not be registered here)."""
        task = self._tasks.get(name)
        defaults = task.defaults if task is not None else None
        send_options = make_send_options(defaults or _NO_OPTIONS, options, task)
        return await self._send(name, None, tuple(args), kwargs or {}, send_options)

    def send_task_sync(
        self,
        name: str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> SyncResult[Any]:
        """:meth:`send_task` from sync code (see :mod:`aioqueue.sync`)."""
        from .sync import send_sync

        return send_sync(self, "app.send_task_sync()", "send_task", name, args, kwargs, **options)

    def signature(
        self,
        name: str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Signature[Any, Any]:
        """A signature by task name (it need not be registered here), for workflows."""
        task = self._tasks.get(name)
        defaults = task.defaults if task is not None else None
        send_options = make_send_options(defaults or _NO_OPTIONS, options, task)
        return Signature(task, tuple(args), dict(kwargs or {}), send_options, name=name, app=self)

    def AsyncResult(self, task_id: str) -> AsyncResult[Any]:
        """A handle on a task sent by anyone, by its id."""
        return AsyncResult(task_id, self)

    def SyncResult(self, task_id: str) -> SyncResult[Any]:
        """:meth:`AsyncResult` for sync code: a handle by id whose methods block (Flask, Django)."""
        from .sync import result_by_id

        return result_by_id(self, task_id)

    async def apply_task(
        self,
        task: Task[Any, R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: SendOptions | None = None,
    ) -> EagerResult[R]:
        """Run ``task`` here at once: an eta is not waited for, but an expired task is REVOKED
        without running, as a worker would record it."""
        from .worker.eager import execute_eagerly

        message = self._build_message(
            task.name, task.queue, args, kwargs, options or _NO_OPTIONS, None, task.priority
        )
        ignored = message.ignore_result
        if message.expires is not None and message.expires < self.clock():
            return EagerResult(Outcome.revoked(message.id, "expired"), ignored=ignored)
        outcome = await execute_eagerly(self, task, message)
        return EagerResult(outcome, ignored=ignored, result_type=task.result_type)

    def resolve_import_path(self) -> str:
        """``module:attribute`` under which a fresh interpreter finds this app."""
        if self.import_path is not None:
            return self.import_path
        module = sys.modules.get(self._defined_in)
        for attr, value in vars(module or {}).items():
            if value is self:
                path = f"{_main_module_name(self._defined_in)}:{attr}"
                self.import_path = path
                return path
        raise ConfigurationError(
            f"cannot find app {self.name!r} at module level in {self._defined_in!r}; "
            "process tasks need an importable app (set app.import_path = 'module:attr')"
        )

    def events(self, *, from_start: bool = False) -> EventFeed:
        """Task events and worker heartbeats as they happen: ``async for event in
        app.events():`` (workers emit them with the ``events`` setting on; see
        :mod:`aioqueue.events`). ``async with app.events() as feed:`` subscribes on entry.
        ``from_start``: the retained ones first (Redis, memory)."""
        from .events import EventFeed

        return EventFeed(self, from_start=from_start)

    # -- worker -------------------------------------------------------------------------

    def worker(self, **options: Any) -> Worker:
        """A worker for this app, to run in this process: ``await app.worker().run()``.

        Options: concurrency, queues, threads, processes, max_tasks_per_child, burst,
        shutdown_timeout (defaults from the app's configuration); ``schedule=False`` leaves the
        periodic entries to other workers or ``aioqueue beat``; ``metrics_port`` (and
        ``metrics_addr``) serve Prometheus metrics (see :mod:`aioqueue.metrics`).
        """
        from .worker import Worker

        return Worker(self, **options)

    def __repr__(self) -> str:
        return (
            f"<App {self.name!r} broker={mask_url(self.conf.broker_url)!r} "
            f"tasks={len(self._tasks)}>"
        )


class _TaskDecorator:
    """What ``@app.task(...)`` returns: applies the options to the decorated function."""

    def __init__(self, register: Callable[[Callable[..., Any]], Task[Any, Any]]) -> None:
        self._register = register

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    def __call__(self, fn: Callable[..., Any], /) -> Task[Any, Any]:
        return self._register(fn)


class _AsyncTaskDecorator:
    """What ``@app.task(executor="async", ...)`` returns: takes coroutine functions only, so
    mypy rejects a plain function there as the runtime does."""

    def __init__(self, register: Callable[[Callable[..., Any]], Task[Any, Any]]) -> None:
        self._register = register

    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]:
        return self._register(fn)


class _BoundTaskDecorator:
    """What ``@app.task(bind=True, ...)`` returns: the function takes a Context first, which
    the task's own signature (what senders pass) leaves out."""

    def __init__(self, register: Callable[[Callable[..., Any]], Task[Any, Any]]) -> None:
        self._register = register

    @overload
    def __call__(
        self, fn: Callable[Concatenate[Context, P], Coroutine[Any, Any, R]], /
    ) -> Task[P, R]: ...

    @overload
    def __call__(self, fn: Callable[Concatenate[Context, P], R], /) -> Task[P, R]: ...

    def __call__(self, fn: Callable[..., Any], /) -> Task[Any, Any]:
        return self._register(fn)


class _BoundAsyncTaskDecorator:
    """``@app.task(bind=True, executor="async")``: coroutine functions taking a Context first."""

    def __init__(self, register: Callable[[Callable[..., Any]], Task[Any, Any]]) -> None:
        self._register = register

    def __call__(
        self, fn: Callable[Concatenate[Context, P], Coroutine[Any, Any, R]], /
    ) -> Task[P, R]:
        return self._register(fn)


async def _release_quietly(backend: ClaimsTaskIds, task_ids: list[str]) -> None:
    """Give back ids claimed for messages that were not sent (best effort: they expire anyway)."""
    for task_id in task_ids:
        with contextlib.suppress(Exception):
            await backend.end_claim(task_id, 0.0)


def _default_backend_url(broker_url: str) -> str:
    scheme = broker_url.partition("://")[0]
    if scheme in {"redis", "rediss", "unix", "redis+cluster", "rediss+cluster", "memory"}:
        return broker_url
    if scheme in {"amqp", "amqps"}:
        return "rpc://"
    raise ConfigurationError(f"no default result backend for broker {mask_url(broker_url)!r}")
