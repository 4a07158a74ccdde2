"""Real processes: three ``aioqueue worker`` and one ``aioqueue beat`` share a 1-second schedule.

Each of the four runs the scheduler; every tick must be sent once, also across a SIGKILL of
the first worker (on AMQP with rpc:// results, the holder of the schedule lease).
"""

from __future__ import annotations

import asyncio
import math
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from conftest import AMQP_URL, REDIS_URL, require_server
from test_periodic import delete_lease_queues
from workers import TESTS_DIR, WorkerProcess, WorkerSet, worker_env

SCHEDULING = r"scheduling 1 periodic entry"
APP = "periodic_app:app"
RUN_SECONDS = 20.0


def tick_due(task_id: str) -> float:
    return int(task_id.rpartition(":")[2]) / 1000


async def start_three_workers_and_a_beat(workers: WorkerSet) -> WorkerProcess:
    """All four scheduling; returns the first worker (on AMQP, the lease holder)."""
    args = ("--concurrency", "4", "--processes", "1", "--loglevel", "info")
    first = await workers.start(*args, app_path=APP)
    await first.wait_for_log(SCHEDULING)  # first in: on AMQP it takes the lease
    others = [await workers.start(*args, app_path=APP) for _ in range(2)]
    beat = await workers.start("--loglevel", "info", app_path=APP, ready=False, subcommand="beat")
    for process in (*others, beat):
        await process.wait_for_log(SCHEDULING)
    return first


async def ticks_run_until(
    client: aioredis.Redis, key_prefix: str, end: float
) -> list[tuple[float, str, int]]:
    """(due, task id, attempt) of each recorded run, once a tick due after ``end`` has run."""
    deadline = time.monotonic() + 10
    while True:
        raw = await client.lrange(f"{key_prefix}:t:ticks", 0, -1)
        runs = [orjson.loads(item) for item in raw]
        found = [(tick_due(r["id"]), r["id"], r["attempt"]) for r in runs]
        if any(due > end for due, _, _ in found) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.1)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["redis", "amqp-rpc"])
async def test_three_workers_and_a_beat_send_each_tick_once(
    transport: str, key_prefix: str, tmp_path: Path, redis_cleanup: None
) -> None:
    require_server(REDIS_URL, "Redis")
    settings: dict[str, Any] = {}
    if transport == "amqp-rpc":
        require_server(AMQP_URL, "RabbitMQ")
        settings = {
            "broker_url": AMQP_URL,
            "result_backend": "rpc://",
            "amqp_delete_queues_on_close": "1",
        }
    env = worker_env(REDIS_URL, key_prefix, **settings)
    env["PERIODIC_RECORD_URL"] = REDIS_URL
    workers = WorkerSet(env, tmp_path)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        first = await start_three_workers_and_a_beat(workers)
        start = time.time()
        await asyncio.sleep(RUN_SECONDS / 2)  # the experiment's length, not a wait for a state
        first.send_signal(signal.SIGKILL)
        await first.wait_exit(5)
        await asyncio.sleep(start + RUN_SECONDS - time.time())
        end = time.time()
        expected = math.floor(end) - math.floor(start)  # whole seconds in (start, end]

        window = [r for r in await ticks_run_until(client, key_prefix, end) if start < r[0] <= end]
        firsts = Counter(r[1] for r in window if r[2] == 1)
        logs = "\n".join(w.output() for w in workers.workers)
        assert all(count == 1 for count in firsts.values()), f"sent twice: {firsts}\n{logs}"
        if transport == "amqp-rpc":  # the lease moved from the killed worker to another
            taken = [w for w in workers.workers if "schedule lease" in w.stderr()]
            assert taken[0] is first and len(taken) == 2, logs
        ran = {r[1] for r in window}
        # ±1 at the edges: the tick the killed worker held may expire before it comes back.
        assert expected - 1 <= len(ran) <= expected, (sorted(ran), expected, logs)
        for process in workers.workers:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in workers.workers:
            if process is not first:
                assert await process.wait_exit(15) == 0, process.output()
    finally:
        await client.aclose()
        await workers.close()
        if transport == "amqp-rpc":
            await delete_lease_queues(key_prefix)


async def test_schedule_command_lists_entries_with_last_run(
    key_prefix: str, redis_cleanup: None
) -> None:
    require_server(REDIS_URL, "Redis")
    env = worker_env(REDIS_URL, key_prefix)
    env["PERIODIC_RECORD_URL"] = REDIS_URL

    async def listing() -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aioqueue.cli",
            "schedule",
            "periodic_app:app",
            env=env,
            cwd=TESTS_DIR,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return out.decode()

    before = await listing()
    assert before.splitlines()[0].split()[:3] == ["ENTRY", "TASK", "SCHEDULE"]
    assert "heartbeat  periodic_app.tick  every 1s" in before and "never" in before
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        due = 1_800_000_000_000
        await client.hset(
            f"{key_prefix}:beat:heartbeat",
            mapping={"due": due, "task_id": f"periodic:heartbeat:{due}", "sent_at": due},
        )
    finally:
        await client.aclose()
    after = await listing()
    assert "2027-01-15T08:00:00+00:00  PENDING" in after, after
