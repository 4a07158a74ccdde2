"""aioqueue: an asyncio-native distributed task queue.

app = App("proj", broker="redis://127.0.0.1:6379/0")

@app.task
async def add(x: int, y: int) -> int:
    return x + y

result = await add.send(2, 3)
assert await result.get(timeout=5) == 5
"""

import logging

from .app import App
from .brokers.base import DeadLetter
from .config import Config
from .errors import (
    AioQueueError,
    BrokerConnectionError,
    BrokerError,
    ConfigurationError,
    DeliveryLimitExceeded,
    InvalidArguments,
    MessageTooLarge,
    ProtocolError,
    RemoteError,
    ResultBackendError,
    ResultTimeout,
    SerializationError,
    SoftTimeLimitExceeded,
    TaskExpired,
    TaskFailed,
    TaskNotRegistered,
    TaskRevoked,
    TimeLimitExceeded,
    WorkerLostError,
)
from .message import Message, Outcome, States
from .result import AsyncResult, EagerResult
from .task import Signature, Task, TaskOptions
from .worker import Worker

__version__ = "0.1.0"

__all__ = [
    "AioQueueError",
    "App",
    "AsyncResult",
    "BrokerConnectionError",
    "BrokerError",
    "Config",
    "ConfigurationError",
    "DeadLetter",
    "DeliveryLimitExceeded",
    "EagerResult",
    "InvalidArguments",
    "Message",
    "MessageTooLarge",
    "Outcome",
    "ProtocolError",
    "RemoteError",
    "ResultBackendError",
    "ResultTimeout",
    "SerializationError",
    "Signature",
    "SoftTimeLimitExceeded",
    "States",
    "Task",
    "TaskExpired",
    "TaskFailed",
    "TaskNotRegistered",
    "TaskOptions",
    "TaskRevoked",
    "TimeLimitExceeded",
    "Worker",
    "WorkerLostError",
    "__version__",
]

logging.getLogger("aioqueue").addHandler(logging.NullHandler())
