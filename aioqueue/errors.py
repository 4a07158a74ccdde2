"""Every exception aioqueue raises, in one tree.

Library errors from redis-py or aio-pika are translated at the broker/backend seam into these
(``raise ... from exc``), so user code never has to catch a third-party exception from us::

    AioQueueError
    ├── ConfigurationError
    ├── TaskNotRegistered
    ├── InvalidArguments            (also a TypeError)
    ├── SerializationError
    │   └── MessageTooLarge
    ├── ProtocolError
    │   ├── BadSignature
    │   └── LimitExceeded
    ├── BrokerError
    │   └── BrokerConnectionError
    ├── ResultBackendError
    ├── ResultTimeout              (also a TimeoutError)
    ├── TaskRevoked                (TaskExpired is the same class, its former name)
    ├── ResultIgnored
    ├── DeliveryLimitExceeded
    ├── TimeLimitExceeded
    ├── SoftTimeLimitExceeded
    ├── Retry                      (raised by a task to run again later)
    ├── MaxRetriesExceeded
    ├── TaskFailed
    │   ├── RemoteError
    │   └── ChordError             (a chord's member failed: its callback did not run)
    └── WorkerLostError
"""

from __future__ import annotations


class AioQueueError(Exception):
    """Base class: catch this to catch anything aioqueue raises on its own account."""


class ConfigurationError(AioQueueError):
    """Raised when the app's configuration or a URL cannot be used."""


class TaskNotRegistered(AioQueueError):
    """Raised when a task name is not in the app's registry (only registered tasks run)."""


class InvalidArguments(AioQueueError, TypeError):
    """Recorded when a message's arguments do not bind to the task's signature."""


class SerializationError(AioQueueError):
    """Raised when arguments, a message or a result cannot be encoded or decoded."""


class MessageTooLarge(SerializationError):
    """Raised when an encoded message exceeds ``max_message_size``."""


class ProtocolError(AioQueueError):
    """Raised when a message has an unknown envelope version or content type."""


class BadSignature(ProtocolError):
    """Raised when signing is on and a body is unsigned or its MAC matches no key."""


class LimitExceeded(ProtocolError):
    """Raised when a message is over one of the limits in :mod:`aioqueue.input_limits`."""


class BrokerError(AioQueueError):
    """Raised when the broker refuses or fails an operation."""


class BrokerConnectionError(BrokerError):
    """Raised when the broker cannot be reached; the message names the URL, password masked."""


class ResultBackendError(AioQueueError):
    """Raised when the result backend fails to store or fetch an outcome."""


class ResultTimeout(AioQueueError, TimeoutError):
    """Raised when ``AsyncResult.get(timeout=...)`` runs out of time."""


class TaskRevoked(AioQueueError):
    """Raised by ``get()`` for a task that was revoked (state REVOKED).

    ``reason`` says why: "expired" for a message that reached a worker (or ``apply``) after
    its ``expires`` time, or whose ``expires`` falls before its eta; "revoked" for one stopped
    by ``revoke()`` before it started; "terminated" for one stopped while running by
    ``revoke(terminate=True)`` (also what ``ctx.raise_if_cancelled()`` raises).
    """

    def __init__(self, reason: str = "revoked") -> None:
        super().__init__(reason)
        self.reason = reason


TaskExpired = TaskRevoked
"""The former name of :class:`TaskRevoked` (an expired task used to be a FAILURE with this type).

Kept as the same class rather than a subclass, so ``except TaskExpired`` still catches every
expired task now that the recorded type is TaskRevoked."""


class ResultIgnored(AioQueueError):
    """Raised by ``get()`` on the handle of a task sent with ``ignore_result``.

    Its worker stores and pushes nothing, so waiting would never end; the task still runs, and
    a failure is still logged by the worker (and bad input dead-lettered).
    """


class DeliveryLimitExceeded(AioQueueError):
    """Recorded for a message delivered more than ``max_attempts`` times; it is dead-lettered.

    A task that kills its worker (or that no worker manages to settle) would otherwise come
    back for ever.
    """


class TimeLimitExceeded(AioQueueError):
    """Recorded (FAILURE) for a task still running at its hard ``timeout``.

    An async task was cancelled, a process task's child killed (and replaced), a thread task
    abandoned: Python cannot stop a thread, so its function runs on unseen and its result is
    discarded. The message is acked, not dead-lettered: it ran, and its input was not at fault.
    """


class SoftTimeLimitExceeded(AioQueueError):
    """Raised inside an async task at its ``soft_timeout``, at the await it is blocked in.

    The task may catch it to clean up (and even return a value, which is then its result);
    if it is still running at the hard ``timeout``, it is cancelled.
    """


class Retry(AioQueueError):
    """Raise inside a task (or call ``ctx.retry(...)``) to run it again later.

    The worker re-sends the same task id with its retry count raised, due ``countdown``
    seconds from now (or at ``eta``), atomically with the ack of the current delivery where
    the broker allows it. Without a countdown the task's backoff policy picks the delay.
    ``exc`` is the error being retried: it is recorded with the RETRY state, and becomes the
    FAILURE if no retries are left. ``max_retries`` overrides the task's for this decision.

    Its ``args`` are JSON values (the reason text and the countdown), so it crosses a process
    boundary (``executor="process"``) and rebuilds on the other side.
    """

    def __init__(
        self,
        countdown: float | None = None,
        *,
        exc: BaseException | None = None,
        eta: float | None = None,
        max_retries: int | None = None,
        reason: str | None = None,
    ) -> None:
        _check_retry_value("countdown", countdown, 10 * 365 * 24 * 3600.0)
        _check_retry_value("eta", eta, 253402300799.0)  # a unix time, up to the year 9999
        if max_retries is not None and (
            isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0
        ):
            raise ConfigurationError(
                f"Retry(max_retries=...) must be a whole number of at least 0, not {max_retries!r}"
            )
        self.countdown = countdown
        self.exc = exc
        self.eta = eta
        self.max_retries = max_retries
        if reason is None:
            reason = f"{type(exc).__name__}: {exc}" if exc is not None else "retry requested"
        self.reason = reason
        super().__init__(countdown)

    def __str__(self) -> str:
        when = f" in {self.countdown}s" if self.countdown is not None else ""
        return f"Retry{when}: {self.reason}"


def _check_retry_value(name: str, value: object, highest: float) -> None:
    """Refused where it is raised, so the task fails naming the bad value instead of sending a
    retry no worker would accept."""
    if value is None:
        return
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= highest:
        return
    raise ConfigurationError(
        f"Retry({name}=...) must be a number from 0 to {highest:.0f}, not {value!r}"
    )


class MaxRetriesExceeded(AioQueueError):
    """Recorded (FAILURE) when a task asks to retry with no retries left and no error of its
    own to fail with: ``raise Retry()`` past ``max_retries``."""


class TaskFailed(AioQueueError):
    """Raised by ``AsyncResult.get()`` for a failed task whose exception cannot be rebuilt."""


class RemoteError(TaskFailed):
    """A task failed with an exception type that cannot be imported or rebuilt here.

    Carries the remote type name, message and traceback so nothing about the failure is lost.
    """

    def __init__(self, exc_type: str, message: str, traceback: str | None = None) -> None:
        super().__init__(f"{exc_type}: {message}")
        self.exc_type = exc_type
        self.message = message
        self.remote_traceback = traceback


class WorkerLostError(AioQueueError):
    """Raised (and recorded as FAILURE) when a process-pool child dies while running a task."""


class ChordError(TaskFailed):
    """A chord's callback did not run: a member failed, was revoked or lost its result.

    The message names the member (its task id and name) and its error.
    """
