"""The app the fault-injection tests run in real ``aioqueue worker`` subprocesses.

Broker, backend, key prefix and timings come from the ``AIOQUEUE_*`` variables the test puts in
the worker's environment (process-pool children inherit them). The test registers the same
tasks on an app of its own with :func:`register` and sends through that.

Every task takes the id it was sent under (``tasks.work.options(task_id=tid).send(tid)``),
because a task cannot see its own delivery, and appends one line per event to the run log, a
file shared by every process of the test (path in ``FAULT_RUN_LOG``)::

    start <task id> <pid>     the task body began (before anything that may kill the process)
    end <task id> <pid>       the task body is about to return

Lines are written with one ``os.write`` on an ``O_APPEND`` descriptor: atomic for lines this
short, and in the file before a following ``os._exit`` or SIGKILL, so the checker
(:mod:`faultlib`) counts every run, even one that killed its process.

Workers run at log level ``info`` (their readiness is the "consuming" line) with the per-task
"succeeded" lines filtered out, so a 5,000-task run leaves a log of a few lines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from aioqueue import App, Task

RUN_LOG_ENV = "FAULT_RUN_LOG"


class _QuietSuccess(logging.Filter):
    """Drops the worker's per-task success lines; keeps everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and "succeeded in" in str(record.msg))


logging.getLogger("aioqueue.worker").addFilter(_QuietSuccess())

_log_fd: int | None = None


def note(event: str, task_id: str) -> None:
    """Append ``<event> <task id> <pid>`` to the run log (unbuffered, survives os._exit)."""
    global _log_fd
    if _log_fd is None:
        path = os.environ[RUN_LOG_ENV]
        _log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_log_fd, f"{event} {task_id} {os.getpid()}\n".encode())


@dataclass(frozen=True)
class FaultTasks:
    """The tasks of one app, by role."""

    work: Task[[str, float], list[Any]]
    stall: Task[[str, float, str], int]
    poison: Task[[str], None]
    block_loop: Task[[str, float], int]
    process_work: Task[[str, float], int]
    process_die: Task[[str], None]


async def work(task_id: str, seconds: float = 0.0) -> list[Any]:
    """The ordinary task of every scenario: note, sleep without blocking, note, return."""
    note("start", task_id)
    if seconds:
        await asyncio.sleep(seconds)
    note("end", task_id)
    return [task_id, os.getpid()]


async def stall(task_id: str, first: float, gate: str) -> int:
    """First run: sleep ``first`` s (the test freezes the worker meanwhile); later runs
    wait until the test sets the gate key. Returns the pid of the run that finished.

    "start" is noted once the run has counted itself: a worker frozen between the two would
    otherwise count second after waking, and wait for a gate the test opens only later.
    """
    prefix = f"{app.conf.key_prefix}:fault"  # the worker's app: this runs in a worker
    client = aioredis.Redis.from_url(app.conf.broker_url)
    try:
        run = int(await client.incr(f"{prefix}:runs:{task_id}"))
        note("start", task_id)
        if run == 1:
            await asyncio.sleep(first)
        else:
            deadline = time.monotonic() + 30.0
            while not await client.exists(f"{prefix}:gate:{gate}"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gate {gate} not opened within 30 s")
                await asyncio.sleep(0.01)
    finally:
        await client.aclose()
    note("end", task_id)
    return os.getpid()


async def poison(task_id: str) -> None:
    """Kills the worker process that runs it, every time."""
    note("start", task_id)
    os.kill(os.getpid(), signal.SIGKILL)


async def block_loop(task_id: str, seconds: float) -> int:
    """Blocks the worker's event loop: a sync sleep inside ``async def`` (a user's slip)."""
    note("start", task_id)
    time.sleep(seconds)  # noqa: ASYNC251 - blocking the loop is what this task is for
    note("end", task_id)
    return os.getpid()


def process_work(task_id: str, seconds: float) -> int:
    note("start", task_id)
    time.sleep(seconds)
    note("end", task_id)
    return os.getpid()


def process_die(task_id: str) -> None:
    note("start", task_id)
    os._exit(1)


def register(target: App) -> FaultTasks:
    """Register the fault tasks on ``target`` (the worker's app here, the test's own app)."""
    return FaultTasks(
        work=target.task(name="fault.work")(work),
        stall=target.task(name="fault.stall")(stall),
        poison=target.task(name="fault.poison")(poison),
        block_loop=target.task(name="fault.block_loop")(block_loop),
        process_work=target.task(name="fault.process_work", executor="process")(process_work),
        process_die=target.task(name="fault.process_die", executor="process")(process_die),
    )


app = App("fault-app")
tasks = register(app)
