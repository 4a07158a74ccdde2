"""How a CLI worker process leaves after running thread tasks (issue 7, item 18).

The worker may only leave through ``os._exit`` (which skips atexit handlers: Sentry and
OpenTelemetry flush there) when a thread task is really still running past the grace period;
anyio keeps its idle worker threads alive for a while, and those must not count.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from exit_app import in_thread, stuck
from workers import WorkerSet, worker_env

from aioqueue import App

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

APP_PATH = "exit_app:app"
PROMPTLY = 8.0


@pytest.fixture
def env(redis_url: str, key_prefix: str, tmp_path: Path) -> dict[str, str]:
    values = worker_env(redis_url, key_prefix)
    values["EXIT_APP_MARKER"] = str(tmp_path / "atexit.marker")
    return values


@pytest.fixture
async def workers(
    env: dict[str, str], tmp_path: Path, redis_cleanup: None
) -> AsyncIterator[WorkerSet]:
    """Ends every worker it started (by pid) before the test's keys are deleted."""
    group = WorkerSet(env, tmp_path)
    try:
        yield group
    finally:
        await group.close()


@pytest.fixture
async def client(redis_url: str, key_prefix: str) -> AsyncIterator[App]:
    app = App("client", broker=redis_url, backend=redis_url, key_prefix=key_prefix)
    async with app:
        yield app


def read_text(path: str | Path) -> str | None:
    """The file's text, or None while it does not exist."""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return None


async def test_atexit_handlers_run_after_thread_tasks(
    workers: WorkerSet, client: App, env: dict[str, str]
) -> None:
    worker = await workers.start("--processes", "1", app_path=APP_PATH)
    results = [await client.send_task(in_thread.name, [i]) for i in range(3)]
    assert [await r.get(timeout=10) for r in results] == [[0, True], [1, True], [2, True]]

    worker.send_signal(signal.SIGTERM)
    assert await worker.wait_exit(PROMPTLY) == 0, worker.output()
    assert "abandoning" not in worker.stderr(), worker.output()
    assert read_text(env["EXIT_APP_MARKER"]) == "atexit ran\n", worker.output()


async def test_a_thread_task_past_the_grace_period_still_lets_the_process_exit(
    workers: WorkerSet, client: App, tmp_path: Path
) -> None:
    worker = await workers.start("--processes", "1", "--shutdown-timeout", "0.5", app_path=APP_PATH)
    # Finished thread tasks beside the stuck one: idle anyio threads must not be counted.
    overlapping = [await client.send_task(in_thread.name, [i, 0.3]) for i in range(4)]
    assert [await r.get(timeout=10) for r in overlapping] == [[i, True] for i in range(4)]
    started = tmp_path / "stuck.started"
    await client.send_task(stuck.name, [str(started), 60.0])
    deadline = time.monotonic() + 10
    while read_text(started) is None:
        assert time.monotonic() < deadline, worker.output()
        assert worker.returncode is None, worker.output()
        await asyncio.sleep(0.02)

    began = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert await worker.wait_exit(PROMPTLY) == 0, worker.output()
    assert time.monotonic() - began < PROMPTLY
    assert "abandoning 1 thread task(s) still running" in worker.stderr(), worker.output()
