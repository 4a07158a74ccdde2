"""Runner.threads_running: thread tasks whose function runs right now, awaited or abandoned.

The CLI decides on it whether it must leave through ``os._exit`` (skipping atexit handlers),
so it must count a task abandoned by a cancelled coroutine until its function returns, and
never count anyio's idle pool threads.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from conftest import wait_until

from aioqueue import App
from aioqueue.worker.executors import Runner

pytestmark = pytest.mark.timeout(20)


def blocker(release: threading.Event, entered: threading.Event) -> str:
    entered.set()
    if not release.wait(10):
        raise TimeoutError("never released")
    return "done"


async def test_counts_running_and_abandoned_thread_tasks() -> None:
    runner = Runner(App("threads"), threads=4, processes=0)
    release = threading.Event()
    entries = [threading.Event() for _ in range(3)]
    tasks = [
        asyncio.create_task(runner.run_in_thread(blocker, (release, entered), {}))
        for entered in entries
    ]
    for entered in entries:
        assert await asyncio.to_thread(entered.wait, 5)
    assert runner.threads_running == 3

    tasks[0].cancel()  # shutdown past its grace period: the coroutine stops waiting ...
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    assert runner.threads_running == 3  # ... but the function still runs in its thread

    release.set()
    assert [await t for t in tasks[1:]] == ["done", "done"]

    async def all_returned() -> bool:
        return runner.threads_running == 0

    await wait_until(all_returned, timeout=5)  # the abandoned one too


async def test_idle_pool_threads_and_failures_are_not_counted() -> None:
    runner = Runner(App("idle"), threads=4, processes=0)
    assert await runner.run_in_thread(lambda x: x + 1, (1,), {}) == 2
    with pytest.raises(ZeroDivisionError):
        await runner.run_in_thread(lambda: 1 / 0, (), {})
    assert runner.threads_running == 0  # though anyio keeps the thread alive for more work


async def test_a_task_abandoned_before_its_thread_started_is_not_counted() -> None:
    runner = Runner(App("never"), threads=1, processes=0)
    release, entered = threading.Event(), threading.Event()
    first = asyncio.create_task(runner.run_in_thread(blocker, (release, entered), {}))
    assert await asyncio.to_thread(entered.wait, 5)
    ran = threading.Event()
    queued = asyncio.create_task(runner.run_in_thread(ran.set, (), {}))
    await asyncio.sleep(0)  # it waits for the single thread slot
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert runner.threads_running == 1
    release.set()
    assert await first == "done"
    assert runner.threads_running == 0 and not ran.is_set()
