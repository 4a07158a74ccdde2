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
from .canvas import Chain, Chord, ErrorInfo, FlowResult, Group, GroupResult, chain, chord, group
from .config import Config
from .context import Context, current_context
from .control import Control, RevokeReport
from .errors import (
    AioQueueError,
    BadSignature,
    BrokerConnectionError,
    BrokerError,
    ChordError,
    ConfigurationError,
    DeliveryLimitExceeded,
    InvalidArguments,
    LimitExceeded,
    MaxRetriesExceeded,
    MessageTooLarge,
    ProtocolError,
    RemoteError,
    ResultBackendError,
    ResultIgnored,
    ResultTimeout,
    Retry,
    SerializationError,
    SoftTimeLimitExceeded,
    TaskExpired,
    TaskFailed,
    TaskNotRegistered,
    TaskRevoked,
    TimeLimitExceeded,
    WorkerLostError,
)
from .events import Event, EventFeed
from .hooks import Middleware
from .input_limits import Limits
from .inspection import Inspect
from .masking import Secret
from .message import Message, Outcome, States
from .periodic.schedules import crontab
from .result import AsyncResult, EagerResult, StateUpdate
from .serializers import Serializer, register_serializer
from .sync import SyncCallInEventLoop, SyncResult
from .task import Signature, Task, TaskOptions
from .tracing import Tracing
from .worker import Worker

__version__ = "0.1.0"

__all__ = [
    "AioQueueError",
    "App",
    "AsyncResult",
    "BadSignature",
    "BrokerConnectionError",
    "BrokerError",
    "Chain",
    "Chord",
    "ChordError",
    "Config",
    "ConfigurationError",
    "Context",
    "Control",
    "DeadLetter",
    "DeliveryLimitExceeded",
    "EagerResult",
    "ErrorInfo",
    "Event",
    "EventFeed",
    "FlowResult",
    "Group",
    "GroupResult",
    "Inspect",
    "InvalidArguments",
    "LimitExceeded",
    "Limits",
    "MaxRetriesExceeded",
    "Message",
    "MessageTooLarge",
    "Middleware",
    "Outcome",
    "ProtocolError",
    "RemoteError",
    "ResultBackendError",
    "ResultIgnored",
    "ResultTimeout",
    "Retry",
    "RevokeReport",
    "Secret",
    "SerializationError",
    "Serializer",
    "Signature",
    "SoftTimeLimitExceeded",
    "StateUpdate",
    "States",
    "SyncCallInEventLoop",
    "SyncResult",
    "Task",
    "TaskExpired",
    "TaskFailed",
    "TaskNotRegistered",
    "TaskOptions",
    "TaskRevoked",
    "TimeLimitExceeded",
    "Tracing",
    "Worker",
    "WorkerLostError",
    "__version__",
    "chain",
    "chord",
    "crontab",
    "current_context",
    "group",
    "register_serializer",
]

logging.getLogger("aioqueue").addHandler(logging.NullHandler())
