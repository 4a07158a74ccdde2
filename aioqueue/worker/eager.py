"""``Task.apply``: run a task here through the worker's own steps, with no broker.

The run takes the path a worker's does (arguments checked, time limits, context, retries,
hooks, middleware, the outcome round-tripped through the codec) so an eager call fails
exactly as a remote one would; but nothing is stored. A retry runs again at once, as Celery's
eager mode does: ``apply`` is for tests and scripts, which should not sleep out a countdown.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..context import Running, StateWriter
from ..hooks import MiddlewareHooks, observe
from ..masking import mask_outcome, sensitive_values, wrap_secrets
from ..message import Message, Outcome
from .execution import encode_or_fail, execute
from .executors import Runner
from .retrying import RetryPlan, after_failure

if TYPE_CHECKING:
    from ..app import App
    from ..task import Task

__all__ = ["execute_eagerly"]


class _Unrecorded:
    """``ctx.update_state`` under ``apply``: accepted, kept nowhere (apply stores nothing)."""

    def state_writer(self, message: Message) -> StateWriter:
        async def write(state: str, meta: Any) -> None:
            return None

        return write

    def is_terminated(self, task_id: str) -> bool:
        return False  # nothing can revoke a task run by apply


async def execute_eagerly(app: App, task: Task[Any, Any], message: Message) -> Outcome:
    """Run ``task`` here, retries included; the final outcome as a worker would store it.

    Process tasks run on a thread here: ``apply`` is for tests and scripts, not for isolation.
    """
    runner = Runner(app, threads=None, processes=0)  # anyio's default thread limiter
    middleware = MiddlewareHooks(app.middleware)
    message = app.codec.decode(app.codec.encode(message))
    if task.secret_params:  # as a worker hands them over (see aioqueue.masking)
        args, kwargs = wrap_secrets(task, message.args, message.kwargs)
        message = replace(message, args=args, kwargs=kwargs)
    while True:
        running: Running = (message, 1, None, _Unrecorded(), True)
        if middleware:
            await middleware.before_execute(running)
        ran = await execute(task, message, runner, None, running)
        if ran[2] is not None:
            after = after_failure(task, message, ran)
            if isinstance(after, RetryPlan):
                if task.hooks or middleware:
                    await observe(task, middleware, running, after.state, after.error)
                message = replace(after.message, eta=None)
                continue
            ran = after
            if task.sensitive:  # as a worker records it
                values = sensitive_values(task, message.args, message.kwargs)
                ran = (mask_outcome(ran[0], values), ran[1], ran[2])
        outcome, _, error = ran
        if message.retries:
            outcome = replace(outcome, retries=message.retries)
        raw, recorded, _ = encode_or_fail(app, outcome)
        if task.hooks or middleware:
            await observe(task, middleware, running, recorded, error)
        return app.codec.decode_outcome(raw)
