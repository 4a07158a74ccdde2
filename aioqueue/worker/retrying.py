"""Whether a failed run is tried again, and the message and state that carry the retry.

A run is retried when the task raised :class:`~aioqueue.Retry` (``ctx.retry``), or an
exception its ``retry_for`` lists, and its retries are not used up. The retry is the same
message (same task id, arguments, reply address, limits) with ``headers["retries"]`` raised
and a new eta; the settle step swaps it for the current delivery (see ``settle.Resend``).
Once the retries are used up the task fails for good with the last error, and the message is
kept as a dead letter with the reason, so nothing that was meant to be retried is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..errors import MaxRetriesExceeded, Retry
from ..message import Message, Outcome, States
from .execution import Ran, failure_outcome

if TYPE_CHECKING:
    from ..task import Task

__all__ = ["Exhausted", "RetryPlan", "after_failure", "plan_retry"]


@dataclass(frozen=True, slots=True)
class RetryPlan:
    """Run again at ``eta``: ``message`` is the re-send, ``state`` the RETRY outcome."""

    message: Message
    state: Outcome
    error: BaseException
    """The error being retried (``Retry.exc`` where given): for hooks and the log."""


@dataclass(frozen=True, slots=True)
class Exhausted:
    """No retries left: fail for good with ``error`` and dead-letter the message."""

    error: BaseException
    reason: str


def plan_retry(
    task: Task[Any, Any], message: Message, error: BaseException
) -> RetryPlan | Exhausted | None:
    """What a run that raised ``error`` leads to: a retry, a final failure, or (None) the
    ordinary failure of an error the task does not retry for."""
    policy = task.retry_policy
    if isinstance(error, Retry):
        reason_error: BaseException = error.exc if error.exc is not None else error
        override = error.max_retries
    elif policy.retry_for and isinstance(error, policy.retry_for):
        reason_error, override = error, None
    else:
        return None
    retries = message.retries
    if not policy.allows(retries, override):
        limit = policy.max_retries if override is None else override
        if isinstance(error, Retry) and error.exc is None:
            reason_error = MaxRetriesExceeded(
                f"task {task.name} asked to retry after {retries} retr"
                f"{'y' if retries == 1 else 'ies'}; max_retries={limit}"
            )
        return Exhausted(
            reason_error,
            f"retries exhausted ({retries} of max_retries={limit}): "
            f"{type(reason_error).__name__}: {reason_error}",
        )
    now = task.app.clock()
    if isinstance(error, Retry) and error.eta is not None:
        eta = max(now, error.eta)
    elif isinstance(error, Retry) and error.countdown is not None:
        eta = now + max(0.0, error.countdown)
    else:
        eta = now + policy.delay(retries)
    again = replace(
        message,
        headers={**message.headers, "retries": retries + 1},
        eta=eta,
        sent_at=now,
    )
    failed = failure_outcome(message.id, reason_error)
    state = replace(failed, state=States.RETRY, retries=retries + 1, eta=eta, date_done=None)
    return RetryPlan(again, state, reason_error)


def after_failure(task: Task[Any, Any], message: Message, ran: Ran) -> Ran | RetryPlan:
    """For a run that raised: its retry, or the run as it ends (with the final error and the
    dead-letter reason when its retries are used up)."""
    _, bad_input, error = ran
    if (
        error is None
        or bad_input is not None
        or not (task.retry_policy.retry_for or isinstance(error, Retry))
    ):
        return ran
    plan = plan_retry(task, message, error)
    if plan is None:
        return ran
    if isinstance(plan, Exhausted):
        return failure_outcome(message.id, plan.error), plan.reason, plan.error
    return plan
