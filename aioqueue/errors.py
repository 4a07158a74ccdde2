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
    ├── BrokerError
    │   └── BrokerConnectionError
    ├── ResultBackendError
    ├── ResultTimeout              (also a TimeoutError)
    ├── TaskRevoked                (TaskExpired is the same class, its former name)
    ├── DeliveryLimitExceeded
    ├── TimeLimitExceeded
    ├── SoftTimeLimitExceeded
    ├── TaskFailed
    │   └── RemoteError
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


class BrokerError(AioQueueError):
    """Raised when the broker refuses or fails an operation."""


class BrokerConnectionError(BrokerError):
    """Raised when the broker cannot be reached; the message names the URL, password masked."""


class ResultBackendError(AioQueueError):
    """Raised when the result backend fails to store or fetch an outcome."""


class ResultTimeout(AioQueueError, TimeoutError):
    """Raised when ``AsyncResult.get(timeout=...)`` runs out of time."""


class TaskRevoked(AioQueueError):
    """Raised by ``get()`` for a task that was revoked (state REVOKED) and so never started.

    ``reason`` says why: "expired" for a message that reached a worker (or ``apply``) after
    its ``expires`` time, or whose ``expires`` falls before its eta.
    """

    def __init__(self, reason: str = "revoked") -> None:
        super().__init__(reason)
        self.reason = reason


TaskExpired = TaskRevoked
"""The former name of :class:`TaskRevoked` (an expired task used to be a FAILURE with this type).

Kept as the same class rather than a subclass, so ``except TaskExpired`` still catches every
expired task now that the recorded type is TaskRevoked."""


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
