"""The App: configuration, the task registry, and the sending side.

An App registers tasks and sends messages; it does not consume (that is the Worker) and it does
not read results itself (that is AsyncResult). Each App has its own registry: there is no global
one, so two apps in one process never see each other's tasks.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar, overload

from .backends.base import ListensForReplies
from .brokers.base import Outgoing
from .config import Config, mask_url
from .connections import build_backend, build_broker
from .errors import ConfigurationError, TaskNotRegistered
from .message import Message, MessageCodec, Outcome
from .result import AsyncResult, EagerResult
from .task import (
    Executor,
    SendOptions,
    Signature,
    Task,
    check_result_ttl,
    make_send_options,
    send_times,
)

if TYPE_CHECKING:
    from .backends.base import ResultBackend
    from .brokers.base import Broker
    from .worker import Worker

__all__ = ["App", "task_name_for"]

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
        **config: Any,
    ) -> None:
        self.name = name
        self.conf = Config()
        if isinstance(broker, str):
            config["broker_url"] = broker
        if isinstance(backend, str):
            config["result_backend"] = backend
        self.conf.update(config)
        self._check_conf()
        self._broker: Broker | None = None if isinstance(broker, str | None) else broker
        self._backend: ResultBackend | None = None if isinstance(backend, str | None) else backend
        self._own_broker = self._broker is None
        self._own_backend = self._backend is None
        self._tasks: dict[str, Task[Any, Any]] = {}
        self._codec: MessageCodec | None = None
        self._broker_ready = False
        self._backend_ready = False
        self._connect_lock: asyncio.Lock | None = None
        self.import_path: str | None = None
        """``module:attribute`` that process-pool children import; found on first need."""
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

    def _ensure_unconnected(self) -> None:
        if self._broker_ready or self._backend_ready:
            raise ConfigurationError("configure the app before it connects")

    @property
    def codec(self) -> MessageCodec:
        if self._codec is None:
            self._codec = MessageCodec(
                self.conf.serializer, self.conf.accept_content, self.conf.max_message_size
            )
        return self._codec

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            self._broker = build_broker(self.conf.broker_url, self.conf, self.name)
        return self._broker

    @property
    def backend(self) -> ResultBackend:
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
        result_ttl: float | None = None,
        track_started: bool | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        soft_timeout: float | None = None,
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
        result_ttl: float | None = None,
        track_started: bool | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        soft_timeout: float | None = None,
    ) -> _TaskDecorator: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        executor: Executor | None = None,
        result_ttl: float | None = None,
        track_started: bool | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        soft_timeout: float | None = None,
    ) -> Task[Any, Any] | _TaskDecorator | _AsyncTaskDecorator:
        """Register a function as a task: ``@app.task`` or ``@app.task(queue="high")``.

        Coroutine functions run on the worker's event loop, plain functions on its thread pool
        unless ``executor="process"``; ``executor="async"`` for a plain function is refused.
        ``timeout`` and ``soft_timeout`` are time limits in seconds (see the README's "Time
        limits"); a soft limit is for async tasks only.
        """

        def register(func: Callable[..., Any]) -> Task[Any, Any]:
            task_name = name or task_name_for(func)
            if task_name in self._tasks and self._tasks[task_name].fn is not func:
                existing = self._tasks[task_name].fn
                if task_name_for(existing) != task_name_for(func) or name is not None:
                    raise ConfigurationError(f"a different task is already named {task_name!r}")
            task: Task[Any, Any] = Task(
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
            )
            self._tasks[task_name] = task
            return task

        if fn is not None:
            return register(fn)
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

    async def close(self) -> None:
        """Close the broker and backend connections (safe to call twice)."""
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
    ) -> Message:
        now = time.time()
        eta = expires = None
        if options.countdown is not None or options.eta is not None or options.expires is not None:
            eta, expires = send_times(options, now)
        return Message(
            id=options.task_id or uuid.uuid4().hex,
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
        )

    async def send_message(
        self,
        task: Task[Any, R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: SendOptions | None,
    ) -> AsyncResult[R]:
        return await self._send(task.name, task.queue, args, kwargs, options or _NO_OPTIONS)

    async def _send(
        self,
        task_name: str,
        queue: str | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: SendOptions,
    ) -> AsyncResult[Any]:
        broker = await self.ready_broker()
        backend = self._backend  # not built yet: nobody here waits, so no reply channel
        reply_to = backend.reply_to() if backend is not None else None
        message = self._build_message(task_name, queue, args, kwargs, options, reply_to)
        await broker.publish(message.queue, self.codec.encode(message), eta=message.eta)
        token = backend.send_token() if backend is not None else None
        return AsyncResult(message.id, self, task_name=task_name, token=token)

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
        items: list[Outgoing] = []
        results: list[AsyncResult[R]] = []
        encode = self.codec.encode
        for call in calls:
            if isinstance(call, Signature):
                message = self._build_message(
                    call.task.name, call.task.queue, call.args, call.kwargs, call.options, reply_to
                )
            elif isinstance(call, tuple):
                message = self._build_message(
                    task.name, task.queue, call, {}, options or _NO_OPTIONS, reply_to
                )
            else:
                raise TypeError(
                    f"send_many takes argument tuples or signatures, not {type(call).__name__}"
                )
            items.append((message.queue, encode(message), message.eta))
            results.append(AsyncResult(message.id, self, task_name=message.task, token=token))
        if items:
            await broker.publish_many(items)
        return results

    async def send_task(
        self,
        name: str,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult[Any]:
        """Send a task by name, from code that cannot import it (it need not be registered here)."""
        send_options = make_send_options(_NO_OPTIONS, options, self._tasks.get(name))
        return await self._send(name, None, tuple(args), kwargs or {}, send_options)

    def AsyncResult(self, task_id: str) -> AsyncResult[Any]:
        """A handle on a task sent by anyone, by its id."""
        return AsyncResult(task_id, self)

    async def apply_task(
        self,
        task: Task[Any, R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: SendOptions | None = None,
    ) -> EagerResult[R]:
        """Run ``task`` here at once: an eta is not waited for, but an expired task is REVOKED
        without running, as a worker would record it."""
        from .worker.execution import execute_eagerly

        message = self._build_message(
            task.name, task.queue, args, kwargs, options or _NO_OPTIONS, None
        )
        if message.expires is not None and message.expires < time.time():
            return EagerResult(Outcome.revoked(message.id, "expired"))
        return EagerResult(await execute_eagerly(self, task, message))

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

    # -- worker -------------------------------------------------------------------------

    def worker(self, **options: Any) -> Worker:
        """A worker for this app, to run in this process: ``await app.worker().run()``.

        Options: concurrency, queues, threads, processes, max_tasks_per_child, burst,
        shutdown_timeout (defaults from the app's configuration).
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


def _default_backend_url(broker_url: str) -> str:
    scheme = broker_url.partition("://")[0]
    if scheme in {"redis", "rediss", "unix", "memory"}:
        return broker_url
    if scheme in {"amqp", "amqps"}:
        return "rpc://"
    raise ConfigurationError(f"no default result backend for broker {mask_url(broker_url)!r}")
