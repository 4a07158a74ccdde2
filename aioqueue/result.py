"""Reading a task's outcome: ``AsyncResult`` (from a backend) and ``EagerResult`` (from apply).

A failed task's exception is raised again with its own type when that type can be rebuilt here:
its module must already be imported in this process (a remote message never makes us import a
module) and the exception must be constructible from its recorded args. Otherwise it arrives as
:class:`RemoteError` carrying the remote type name, message and traceback.
"""

from __future__ import annotations

import abc
import sys
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from .errors import RemoteError
from .message import Outcome, States

if TYPE_CHECKING:
    from .app import App

__all__ = ["AsyncResult", "EagerResult", "rebuild_exception"]

R = TypeVar("R")


def rebuild_exception(outcome: Outcome) -> BaseException:
    """The task's exception as an instance of its own type where possible, else RemoteError."""
    type_name = outcome.exc_type or "Exception"
    message = outcome.exc_message or ""
    module_name, _, qualname = type_name.rpartition(".")
    exc_class: Any = sys.modules.get(module_name or "builtins")
    for part in qualname.split("."):
        exc_class = getattr(exc_class, part, None)
    exc: BaseException
    if isinstance(exc_class, type) and issubclass(exc_class, Exception):
        try:
            exc = exc_class(*outcome.exc_args)
        except Exception:
            exc = RemoteError(type_name, message, outcome.traceback)
    else:
        exc = RemoteError(type_name, message, outcome.traceback)
    if outcome.traceback:
        exc.add_note(f"Remote traceback (task {outcome.task_id}):\n{outcome.traceback}")
    return exc


class _OutcomeReader(Generic[R], metaclass=abc.ABCMeta):
    """What AsyncResult and EagerResult share: turning an Outcome into a value or an error."""

    __slots__ = ()
    id: str

    @abc.abstractmethod
    async def _outcome(self) -> Outcome | None:
        """The stored outcome, or None while nothing is known."""

    @staticmethod
    def _value(outcome: Outcome, propagate: bool) -> R:
        if outcome.state == States.FAILURE or outcome.state == States.REVOKED:
            exc = rebuild_exception(outcome)
            if propagate:
                raise exc
            return cast(R, exc)
        return cast(R, outcome.result)

    async def state(self) -> str:
        """PENDING (unknown, or its result's TTL ran out), RECEIVED, STARTED, SUCCESS, FAILURE
        or REVOKED (never started: it had expired)."""
        outcome = await self._outcome()
        return outcome.state if outcome is not None else States.PENDING

    async def ready(self) -> bool:
        """True once the task has finished, successfully or not, or was revoked."""
        return await self.state() in States.READY

    async def successful(self) -> bool:
        return await self.state() == States.SUCCESS

    async def failed(self) -> bool:
        return await self.state() == States.FAILURE

    async def revoked(self) -> bool:
        return await self.state() == States.REVOKED

    async def info(self) -> Any:
        """The result if the task succeeded, the exception if it failed or was revoked, else
        None."""
        outcome = await self._outcome()
        if outcome is None or not outcome.ready:
            return None
        return self._value(outcome, propagate=False)

    async def traceback(self) -> str | None:
        """The remote traceback of a failed task, as text."""
        outcome = await self._outcome()
        return outcome.traceback if outcome is not None else None


class AsyncResult(_OutcomeReader[R]):
    """A handle on a sent task. ``await result.get(timeout=5)`` waits for its value.

    The handle keeps no copy of the outcome: every read asks the backend, whose local copy in
    the sending process costs no round trip and honours ``forget()`` and the result TTL. So a
    handle never reports a value that ``state()`` (or any other handle) says is gone.
    """

    __slots__ = ("_app", "_token", "id", "task_name")

    def __init__(
        self, id: str, app: App, *, task_name: str | None = None, token: object = None
    ) -> None:
        self.id = id
        self.task_name = task_name
        self._app = app
        self._token = token

    async def get(self, timeout: float | None = None, propagate: bool = True) -> R:
        """Wait for the outcome (woken by a push, never by polling).

        Raises :class:`~aioqueue.ResultTimeout` after ``timeout`` seconds, and the task's own
        exception if it failed, :class:`~aioqueue.TaskRevoked` if it was revoked (unless
        ``propagate=False``, which returns the exception instead).
        """
        backend = await self._app.ready_backend()
        raw = await backend.wait(self.id, timeout=timeout, token=self._token)
        return self._value(self._app.codec.decode_outcome(raw), propagate)

    async def _outcome(self) -> Outcome | None:
        backend = await self._app.ready_backend()
        raw = await backend.get(self.id)
        return self._app.codec.decode_outcome(raw) if raw is not None else None

    async def forget(self) -> None:
        """Delete the stored outcome now instead of waiting for its TTL (here too)."""
        backend = await self._app.ready_backend()
        await backend.forget(self.id)

    def __repr__(self) -> str:
        return f"<AsyncResult {self.id} task={self.task_name!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)


class EagerResult(_OutcomeReader[R]):
    """The outcome of ``Task.apply``: already known, with the same reading API."""

    __slots__ = ("id", "outcome")

    def __init__(self, outcome: Outcome) -> None:
        self.id = outcome.task_id
        self.outcome = outcome

    async def get(self, timeout: float | None = None, propagate: bool = True) -> R:
        return self._value(self.outcome, propagate)

    async def _outcome(self) -> Outcome | None:
        return self.outcome

    def __repr__(self) -> str:
        return f"<EagerResult {self.id} {self.outcome.state}>"
