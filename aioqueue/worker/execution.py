"""Run one task and describe how it ended: the "execute" step of decode / execute / settle.

Shared by the worker and by ``Task.apply``, so an eager call fails exactly as a remote one would.
"""

from __future__ import annotations

import time
import traceback
from typing import TYPE_CHECKING, Any

import orjson

from ..errors import InvalidArguments, SerializationError
from ..message import Message, Outcome, States
from .executors import ChildTaskError, OnStart, Runner

if TYPE_CHECKING:
    from ..app import App
    from ..task import Task

__all__ = ["execute", "execute_eagerly", "failure_outcome", "type_name"]


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


async def _call(
    task: Task[Any, Any], message: Message, runner: Runner, on_start: OnStart | None
) -> Any:
    if task.executor == "async":
        if on_start is not None:
            await on_start()
        return await task.fn(*message.args, **message.kwargs)
    if task.executor == "thread":
        return await runner.run_in_thread(task.fn, message.args, message.kwargs, on_start)
    return await runner.run_in_process(task, message.args, message.kwargs, on_start)


async def execute(
    task: Task[Any, Any], message: Message, runner: Runner, on_start: OnStart | None = None
) -> tuple[Outcome, str | None]:
    """Run the task; returns its outcome and, when the message itself is bad, why.

    A TypeError is only blamed on the message after checking that its arguments really do not
    bind to the signature, so the check costs nothing on the success path.
    """
    try:
        value = await _call(task, message, runner, on_start)
    except ChildTaskError as exc:
        outcome = exc.outcome(message.id)
        if outcome.exc_type == "builtins.TypeError":
            reason = _arguments_fit(task, message)
            if reason is not None:
                return failure_outcome(message.id, InvalidArguments(reason)), reason
        return outcome, None
    except TypeError as exc:
        reason = _arguments_fit(task, message)
        if reason is not None:
            return failure_outcome(message.id, InvalidArguments(reason)), reason
        return failure_outcome(message.id, exc), None
    except Exception as exc:
        return failure_outcome(message.id, exc), None
    return Outcome(message.id, States.SUCCESS, value, date_done=time.time()), None


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


async def execute_eagerly(app: App, task: Task[Any, Any], message: Message) -> Outcome:
    """``Task.apply``: run here, round-trip the outcome through the codec, store nothing.

    Process tasks run on a thread here: ``apply`` is for tests and scripts, not for isolation.
    """
    runner = Runner(app, threads=None, processes=0)  # anyio's default thread limiter
    encoded_message = app.codec.decode(app.codec.encode(message))
    outcome, _ = await execute(task, encoded_message, runner)
    raw, _, _ = encode_or_fail(app, outcome)
    return app.codec.decode_outcome(raw)
