"""Log lines a worker writes, and how the CLI sets logging up (the library itself only adds a
``NullHandler``: an application that embeds a worker configures logging its own way).

One line per task: ``add[3f2a...] succeeded in 0.4 ms: 5``, or ``failed``, ``retry 1 in 2.00s``,
``revoked``. Each such record carries the task's fields as attributes (see :data:`TASK_FIELDS`),
which ``--log-format json`` writes as JSON keys for log shippers::

    {"time": "...", "level": "INFO", "logger": "aioqueue.worker", "message": "...",
     "task_id": "...", "task": "add", "queue": "default", "attempt": 1,
     "runtime": 0.0004, "outcome": "succeeded"}

A failure's traceback goes on its line at debug level, or always with ``--tracebacks`` (which
enables the :data:`TRACEBACKS` logger); in JSON it is the ``traceback`` key.
Dependencies (redis-py, aio-pika, aiormq, asyncio) log at ``--dependency-loglevel``, warning by
default, so ``--loglevel debug`` shows aioqueue's debug lines without their noise.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

__all__ = [
    "DEPENDENCY_LOGGERS",
    "TASK_FIELDS",
    "TRACEBACKS",
    "JsonFormatter",
    "configure_logging",
    "show_tracebacks",
]

TASK_FIELDS = ("task_id", "task", "queue", "attempt", "runtime", "outcome", "traceback")
"""Attributes a task's log record carries (``traceback`` only when tracebacks are shown)."""
DEPENDENCY_LOGGERS = ("aio_pika", "aiormq", "pamqp", "redis", "asyncio", "uvloop")
TRACEBACKS = logging.getLogger("aioqueue.tracebacks")
"""Enabled for debug by ``--tracebacks`` (or ``--loglevel debug``): failures carry tracebacks,
as they do whenever the ``aioqueue.worker`` logger is enabled for debug."""
_TEXT_FORMAT = "[%(asctime)s %(levelname)s %(name)s] %(message)s"


def show_tracebacks() -> bool:
    return TRACEBACKS.isEnabledFor(logging.DEBUG)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the task fields it has, and
    ``exception`` for a record logged with exc_info."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        for name in TASK_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                data[name] = value
        if "traceback" in data:  # a key of its own: the message stays one line
            data["message"] = message.split("\n", 1)[0]
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


def configure_logging(
    level: str,
    *,
    log_format: str = "text",
    tracebacks: bool = False,
    dependency_level: str = "warning",
) -> None:
    """Log to stderr at ``level``, as text or JSON lines (the CLI's worker and beat)."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for name in DEPENDENCY_LOGGERS:
        logging.getLogger(name).setLevel(dependency_level.upper())
    if tracebacks:
        TRACEBACKS.setLevel(logging.DEBUG)
