"""The running task's own context: ``@app.task(bind=True)`` and :func:`current_context`.

A bound task gets a :class:`Context` as its first argument (Celery's ``self.request`` plus
``self.retry``)::

    @app.task(bind=True, max_retries=5)
    async def charge(ctx: Context, customer: str, cents: int) -> str:
        try:
            return await gateway.charge(customer, cents, idempotency_key=ctx.id)
        except GatewayBusy as exc:
            ctx.retry(countdown=10, exc=exc)

``charge`` is still a ``Task[[str, int], str]``: senders pass only ``customer`` and ``cents``.

Any task, bound or not, can read the same object from :func:`current_context` (a contextvar,
copied into the thread of a thread task); middleware hooks receive it too.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from .errors import ConfigurationError, Retry, TaskRevoked

if TYPE_CHECKING:
    from .message import Message

__all__ = ["Context", "current_context"]

StateWriter = Callable[[str, Any], Awaitable[None]]
BlockingStateWriter = Callable[[str, Any], None]


class StateSink(Protocol):
    """Where a run's intermediate states go (the worker's handler, or ``apply``'s backend)."""

    def state_writer(self, message: Message) -> StateWriter: ...

    def is_terminated(self, task_id: str) -> bool:
        """True once ``revoke(terminate=True)`` reached the worker running ``task_id``."""


Running = tuple["Message", int, "str | None", "StateSink | None", bool]
"""What the worker records per run: (message, attempt, worker id, state sink, is_eager).

A tuple rather than a Context: most tasks never ask, and the Context is built on demand."""


class Context:
    """What a task knows about its own run. Read-only, except through its methods."""

    __slots__ = (
        "_blocking",
        "_terminated",
        "_update",
        "args",
        "attempt",
        "eta",
        "expires",
        "headers",
        "id",
        "is_eager",
        "kwargs",
        "name",
        "parent_id",
        "queue",
        "retries",
        "root_id",
        "worker_id",
    )

    def __init__(
        self,
        *,
        id: str,
        name: str,
        queue: str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        attempt: int = 1,
        retries: int = 0,
        eta: float | None = None,
        expires: float | None = None,
        headers: dict[str, Any] | None = None,
        parent_id: str | None = None,
        root_id: str | None = None,
        worker_id: str | None = None,
        is_eager: bool = False,
        update: StateWriter | None = None,
        update_blocking: BlockingStateWriter | None = None,
        terminated: Callable[[str], bool] | None = None,
    ) -> None:
        self.id = id
        """The task id: the same on every retry, so it makes a good idempotency key."""
        self.name = name
        self.queue = queue
        self.args = args
        self.kwargs = kwargs if kwargs is not None else {}
        self.attempt = attempt
        """Deliveries of this message so far (1, unless a worker died running it)."""
        self.retries = retries
        """Retries made before this run (0 on the first try)."""
        self.eta = eta
        self.expires = expires
        self.headers = headers if headers is not None else {}
        self.parent_id = parent_id
        self.root_id = root_id
        self.worker_id = worker_id
        """Id of the worker running the task (None when eager or in a process-pool child)."""
        self.is_eager = is_eager
        """True inside ``Task.apply``: run here, no broker."""
        self._update = update
        self._blocking = update_blocking
        self._terminated = terminated

    @classmethod
    def of(cls, running: Running) -> Context:
        """The context of a run the worker recorded."""
        message, attempt, worker_id, sink, is_eager = running
        return cls(
            id=message.id,
            name=message.task,
            queue=message.queue,
            args=message.args,
            kwargs=message.kwargs,
            attempt=attempt,
            retries=message.retries,
            eta=message.eta,
            expires=message.expires,
            headers=message.headers,
            parent_id=message.parent_id,
            root_id=message.root_id,
            worker_id=worker_id,
            is_eager=is_eager,
            update=sink.state_writer(message) if sink is not None else None,
            terminated=sink.is_terminated if sink is not None else None,
        )

    def retry(
        self,
        countdown: float | None = None,
        *,
        exc: BaseException | None = None,
        eta: float | None = None,
        max_retries: int | None = None,
    ) -> NoReturn:
        """Stop this run and run the task again later: raises :class:`~aioqueue.Retry`.

        Works in every spelling: ``ctx.retry(...)``, ``raise ctx.retry(...)`` and, in an async
        task, ``await ctx.retry(...)``. ``exc`` is the error being retried (it becomes the
        FAILURE if no retries are left); ``max_retries`` overrides the task's for this call.
        """
        raise Retry(countdown, exc=exc, eta=eta, max_retries=max_retries)

    async def update_state(self, state: str, meta: Any = None) -> None:
        """Record an intermediate state (for example "PROGRESS" with ``{"done": 40}``).

        ``await result.state()`` and ``await result.info()`` read it until the outcome is
        stored. For async tasks; from a thread task use :meth:`update_state_blocking`. A
        final state (SUCCESS, FAILURE, REVOKED) is refused: only the worker records those.
        """
        _check_state(state)
        if self._update is not None:
            await self._update(state, meta)
        elif self._blocking is not None:
            self._blocking(state, meta)
        else:
            raise ConfigurationError(
                f"task {self.name}: update_state has no result backend to write to "
                "(this Context was built by hand, not by a worker)"
            )

    def update_state_blocking(self, state: str, meta: Any = None) -> None:
        """:meth:`update_state` from a thread task (it waits for the event loop to store it)
        or a process task (the child sends it to the worker, which stores it)."""
        if self._blocking is not None:
            _check_state(state)
            self._blocking(state, meta)
            return
        import anyio.from_thread

        anyio.from_thread.run(self.update_state, state, meta)

    @property
    def cancelled(self) -> bool:
        """True once ``revoke(terminate=True)`` reached the worker running this task.

        An async task is cancelled and a process task's child killed, so only a thread task
        needs to look (Python cannot stop a thread): check it between steps and return, or
        call :meth:`raise_if_cancelled`. Its result is discarded either way.
        """
        return self._terminated is not None and self._terminated(self.id)

    def raise_if_cancelled(self) -> None:
        """Raise :class:`~aioqueue.TaskRevoked` if the task was terminated (see ``cancelled``)."""
        if self.cancelled:
            raise TaskRevoked("terminated")

    def __repr__(self) -> str:
        return f"<Context {self.name}[{self.id}] attempt={self.attempt} retries={self.retries}>"


def _check_state(state: str) -> None:
    if state in ("SUCCESS", "FAILURE", "REVOKED") or not isinstance(state, str) or not state:
        raise ConfigurationError(
            f"update_state takes an intermediate state name, not {state!r}: the task's "
            "return value or exception decides its final state"
        )


running_task: contextvars.ContextVar[Running | None] = contextvars.ContextVar(
    "aioqueue_current_task", default=None
)
"""Set by the worker around each run (``execute``), read by :func:`current_context`."""
_current = running_task


def current_context() -> Context | None:
    """The context of the task running in this coroutine or thread, None outside a task.

    Not inside a process-pool child (it runs the function alone); bind the task instead.
    """
    running = _current.get()
    return Context.of(running) if running is not None else None


def set_running(running: Running) -> contextvars.Token[Running | None]:
    return _current.set(running)


def reset_running(token: contextvars.Token[Running | None]) -> None:
    _current.reset(token)
