"""``aioqueue events`` following a real worker subprocess with ``AIOQUEUE_EVENTS=1``, on Redis
and on RabbitMQ alone (a topic exchange): the order of a retried task's events."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REDIS_URL, delete_prefixed
from workers import TESTS_DIR, WorkerSet, worker_env

from aioqueue import App

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def client(urls: tuple[str, str], key_prefix: str) -> AsyncIterator[App]:
    broker, backend = urls
    app = App(
        "client",
        broker=broker,
        backend=backend,
        key_prefix=key_prefix,
        events=True,
        amqp_delete_queues_on_close=True,
    )
    async with app:
        yield app
    if backend.startswith("redis"):
        await delete_prefixed(REDIS_URL, key_prefix)


async def test_events_tail_shows_a_retried_task_in_order(
    client: App, urls: tuple[str, str], key_prefix: str, tmp_path: Path
) -> None:
    broker, backend = urls
    env = worker_env(broker, key_prefix, result_backend=backend, events="1")
    tail = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aioqueue.cli",
        "events",
        "ops_app:app",
        "--json",
        "--no-heartbeats",
        cwd=TESTS_DIR,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    workers = WorkerSet(env, tmp_path)
    try:
        assert tail.stderr is not None and tail.stdout is not None
        async with asyncio.timeout(20):
            assert b"following events" in await tail.stderr.readline()
        worker = await workers.start("-c", "2", app_path="ops_app:app")
        wid = await worker.wait_ready()
        result = await client.send_task("ops_app.flaky")
        assert await result.get(timeout=20) == 1

        events: list[dict[str, Any]] = []
        async with asyncio.timeout(20):
            while not any(
                e["type"] == "task-succeeded" and e.get("task_id") == result.id for e in events
            ):
                events.append(json.loads(await tail.stdout.readline()))
        mine = [e for e in events if e.get("task_id") == result.id]
        assert [e["type"] for e in mine] == [
            "task-sent",
            "task-received",
            "task-started",
            "task-progress",
            "task-retried",
            "task-received",
            "task-started",
            "task-progress",
            "task-succeeded",
        ]
        assert all(e["worker"] == wid for e in mine[1:])
        assert [e["attempt"] for e in mine[1:] if e["type"] == "task-started"] == [1, 1]
        assert mine[-1]["runtime"] > 0 and mine[4]["retries"] == 1
        assert {"type": "worker-online", "worker": wid}.items() <= events[0].items()
    finally:
        if tail.returncode is None:
            tail.terminate()
        await tail.wait()
        await workers.close()
