"""Reading a task's outcome: ``AsyncResult`` (from a backend) and ``EagerResult`` (from apply).

A failed task's exception is raised again with its own type when that type can be rebuilt here:
its module must already be imported in this process (a remote message never makes us import a
module) and the exception must be constructible from its recorded args. Otherwise it arrives as
:class:`RemoteError` carrying the remote type name, message and traceback.
"""

from __future__ import annotations

import abc
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from .backends.base import Watches
from .errors import ConfigurationError, RemoteError, ResultIgnored, SerializationError
from .message import Outcome, States

if TYPE_CHECKING:
    from .app import App
    from .control import RevokeReport
    from .typed import Convert

__all__ = ["AsyncResult", "EagerResult", "StateUpdate", "rebuild_exception"]

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


def _ignored_error(task_id: str) -> ResultIgnored:
    return ResultIgnored(
        f"task {task_id} was sent with ignore_result: no outcome is kept for it, so there is "
        "nothing to wait for (send it without ignore_result to read its result)"
    )


@dataclass(frozen=True, slots=True)
class StateUpdate:
    """One state change seen by ``result.watch()``."""

    state: str
    meta: Any
    """What ``info()`` would say: a state's meta, the result, or the exception."""
    outcome: Outcome
    """The whole record; for the final update, the outcome (``ready`` is True)."""

    @property
    def ready(self) -> bool:
        return self.outcome.ready


def _info(outcome: Outcome) -> Any:
    if outcome.state == States.RETRY:
        return rebuild_exception(outcome)
    if outcome.state == States.FAILURE or outcome.state == States.REVOKED:
        return rebuild_exception(outcome)
    return outcome.result


class _OutcomeReader(Generic[R], metaclass=abc.ABCMeta):
    """What AsyncResult and EagerResult share: turning an Outcome into a value or an error."""

    __slots__ = ()
    id: str

    @abc.abstractmethod
    async def _outcome(self) -> Outcome | None:
        """The stored outcome, or None while nothing is known."""

    def _result_type(self) -> Convert | None:
        """How to rebuild the result from the task's return annotation (None: as decoded)."""
        return None

    def _value(self, outcome: Outcome, propagate: bool) -> R:
        if outcome.state == States.FAILURE or outcome.state == States.REVOKED:
            exc = rebuild_exception(outcome)
            if propagate:
                raise exc
            return cast(R, exc)
        result = outcome.result
        if result is not None and (convert := self._result_type()) is not None:
            try:
                result = convert(result)
            except (ValueError, TypeError) as exc:
                raise SerializationError(
                    f"result of task {self.id} does not fit its return annotation: {exc}"
                ) from None
        return cast(R, result)

    async def state(self) -> str:
        """PENDING (unknown, or its result's TTL ran out), RECEIVED, STARTED, RETRY (failed,
        will run again), SUCCESS, FAILURE or REVOKED (never started: it had expired); or a
        custom state the task recorded with ``ctx.update_state``."""
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
        """The result if the task succeeded, the exception if it failed or was revoked (or,
        in RETRY, the error it will be retried for), the meta of a state recorded with
        ``ctx.update_state``, else None."""
        outcome = await self._outcome()
        if outcome is None:
            return None
        if outcome.state == States.RETRY:
            return rebuild_exception(outcome)
        if not outcome.ready:
            return outcome.result
        return self._value(outcome, propagate=False)

    async def retries(self) -> int:
        """Retries the task has made so far (0 before any, or when nothing is known)."""
        outcome = await self._outcome()
        return outcome.retries if outcome is not None else 0

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

    __slots__ = ("_app", "_ignored", "_token", "id", "task_name")

    def __init__(
        self,
        id: str,
        app: App,
        *,
        task_name: str | None = None,
        token: object = None,
        ignored: bool = False,
    ) -> None:
        self.id = id
        self.task_name = task_name
        self._app = app
        self._token = token
        self._ignored = ignored

    def _result_type(self) -> Convert | None:
        """The task's, when this app registers it (a handle made from a bare id has none)."""
        if self.task_name is None:
            return None
        task = self._app.tasks.get(self.task_name)
        return task.result_type if task is not None else None

    async def get(self, timeout: float | None = None, propagate: bool = True) -> R:
        """Wait for the outcome (woken by a push, never by polling).

        Raises :class:`~aioqueue.ResultTimeout` after ``timeout`` seconds, and the task's own
        exception if it failed, :class:`~aioqueue.TaskRevoked` if it was revoked (unless
        ``propagate=False``, which returns the exception instead), and
        :class:`~aioqueue.ResultIgnored` at once for a task sent with ``ignore_result``.
        """
        if self._ignored:
            raise _ignored_error(self.id)
        backend = await self._app.ready_backend()
        raw = await backend.wait(self.id, timeout=timeout, token=self._token)
        return self._value(self._app.codec.decode_outcome(raw), propagate)

    @property
    def parent(self) -> Any:
        """In a workflow sent from this process, the handle of the step before this one (a
        GroupResult before a chord's callback); else None. See "Workflows" in the README."""
        return None

    @property
    def children(self) -> list[Any]:
        """In a workflow sent from this process, the handles of what this step sends (the
        next step, links, errbacks); else empty."""
        return []

    async def _outcome(self) -> Outcome | None:
        backend = await self._app.ready_backend()
        raw = await backend.get(self.id)
        return self._app.codec.decode_outcome(raw) if raw is not None else None

    async def revoke(self, terminate: bool = False) -> RevokeReport:
        """Stop the task from ever starting, on every worker; ``terminate=True`` also stops
        it while it runs. See :meth:`aioqueue.control.Control.revoke`."""
        return await self._app.control.revoke(self.id, terminate=terminate)

    async def watch(self) -> AsyncIterator[StateUpdate]:
        """Every state change, pushed, the current one first, until the final one::

            async for update in result.watch():
                print(update.state, update.meta)

        States are stored when a worker records them: RECEIVED and STARTED with
        ``track_started``, RETRY, and what the task reports with ``ctx.update_state``.
        """
        backend = await self._app.ready_backend()
        if not isinstance(backend, Watches):
            raise ConfigurationError(f"result backend {backend.url} cannot push state changes")
        decode = self._app.codec.decode_outcome
        async for raw in backend.watch(self.id, token=self._token):
            outcome = decode(raw)
            yield StateUpdate(outcome.state, _info(outcome), outcome)
            if outcome.ready:
                return

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

    __slots__ = ("_ignored", "_type", "id", "outcome")

    def __init__(
        self, outcome: Outcome, *, ignored: bool = False, result_type: Convert | None = None
    ) -> None:
        self.id = outcome.task_id
        self.outcome = outcome
        self._ignored = ignored
        self._type = result_type

    def _result_type(self) -> Convert | None:
        return self._type

    async def get(self, timeout: float | None = None, propagate: bool = True) -> R:
        """The value; with ``ignore_result``, ResultIgnored as for a sent task."""
        if self._ignored:
            raise _ignored_error(self.id)
        return self._value(self.outcome, propagate)

    async def _outcome(self) -> Outcome | None:
        return self.outcome

    def __repr__(self) -> str:
        return f"<EagerResult {self.id} {self.outcome.state}>"
