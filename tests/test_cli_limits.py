"""Rate limits and concurrency caps held across two real CLI workers (issue 9, items 3-4).

Each test runs two ``python -m aioqueue.cli worker cli_app:app`` processes (tests/workers.py)
under a key prefix of its own, on Redis and on RabbitMQ with Redis results (where the limiter
counts in the results' Redis). The tasks (``cli_app.rated`` / ``cli_app.capped``) log each start
(and end) with its pid and unix time to one Redis list per test, and the test checks the limit on
those times. Waits poll a condition with a deadline; nothing sleeps and hopes.
"""

from __future__ import annotations

import itertools
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from cli_app import capped, rated, record_key
from conftest import AMQP_URL, REDIS_URL, delete_prefixed, require_server, wait_until
from test_cli_kill_delays import delete_amqp_queues
from workers import WorkerSet, worker_env

from aioqueue import App

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

LEASE = 1.5
"""The workers' concurrency_lease_ttl: a SIGKILLed worker's permit comes back this long after
its last renewal (renewed every LEASE / 3)."""


class Run:
    """The client app, the two workers' set and the Redis the tasks log to, for one test."""

    def __init__(self, broker: str, workers: WorkerSet, client: App, rdb: aioredis.Redis) -> None:
        self.broker = broker
        self.workers = workers
        self.client = client
        self.rdb = rdb
        self.token = uuid.uuid4().hex

    async def entries(self, kind: str) -> list[dict[str, Any]]:
        prefix = self.client.conf.key_prefix
        raw = await self.rdb.lrange(record_key(kind, self.token, prefix), 0, -1)
        return [orjson.loads(entry) for entry in raw]

    async def wait_entries(self, kind: str, count: int, timeout: float) -> list[dict[str, Any]]:
        async def enough() -> bool:
            return len(await self.entries(kind)) >= count

        await wait_until(enough, timeout=timeout, interval=0.02)
        return await self.entries(kind)


@pytest.fixture(params=["redis", "amqp"])
async def run(
    request: pytest.FixtureRequest, key_prefix: str, tmp_path: Path
) -> AsyncIterator[Run]:
    broker = str(request.param)
    require_server(REDIS_URL, "Redis")
    if broker == "amqp":
        require_server(AMQP_URL, "RabbitMQ")
    url = AMQP_URL if broker == "amqp" else REDIS_URL
    env = worker_env(REDIS_URL, key_prefix, broker_url=url, concurrency_lease_ttl=str(LEASE))
    workers = WorkerSet(env, tmp_path)
    rdb = aioredis.Redis.from_url(REDIS_URL)
    client = App("client", broker=url, backend=REDIS_URL, key_prefix=key_prefix)
    try:
        async with client:
            yield Run(broker, workers, client, rdb)
    finally:
        await workers.close()
        await rdb.aclose()
        await delete_prefixed(REDIS_URL, key_prefix)
        if broker == "amqp":
            await delete_amqp_queues(key_prefix)


async def test_a_rate_limit_of_10_per_second_holds_across_two_workers_for_10_seconds(
    run: Run,
) -> None:
    """101 tasks limited to 10/s (burst 1), queued before two workers with 20 slots each start:
    the 100 intervals between their starts take 10 s within 10%, both workers run some, and no
    second holds more than 10% (+1 for the window's edge) over the limit."""
    a = await run.workers.start("--concurrency", "20", name="A")
    b = await run.workers.start("--concurrency", "20", name="B")
    count = 101
    for _ in range(count):
        await run.client.send_task(rated.name, [run.token])
    starts = sorted(entry["at"] for entry in await run.wait_entries("stamp", count, 30))
    stamps = await run.entries("stamp")
    span = starts[-1] - starts[0]
    print(f"\n{run.broker}: 100 intervals at 10/s took {span:.3f}s ({100 / span:.2f}/s)")
    assert 10 * 0.9 <= span <= 10 * 1.1, span
    assert {entry["pid"] for entry in stamps} == {a.pid, b.pid}
    busiest = max(sum(1 for at in starts if t <= at < t + 1.0) for t in starts)
    assert busiest <= 12, busiest  # 10/s, never a burst (a window can catch 11 exact starts)
    assert len(stamps) == count  # each ran once


async def test_a_concurrency_cap_of_2_holds_across_two_workers_and_a_killed_ones_permit_returns(
    run: Run,
) -> None:
    """12 tasks capped at 2, 0.6 s each, on two workers with 4 slots each. The worker running the
    first task is SIGKILLed mid-task: its permit is held until its lease lapses (LEASE), so the
    survivor runs one at a time meanwhile, then two again; the killed task runs again. At no
    moment do more than 2 run (the killed run counted until the kill)."""
    a = await run.workers.start("--concurrency", "4", name="A")
    b = await run.workers.start("--concurrency", "4", name="B")
    total = 12
    for n in range(total):
        await run.client.send_task(capped.name, [run.token, n, 0.6])
    first = (await run.wait_entries("stamp", 1, 15))[0]
    victim, survivor = (a, b) if first["pid"] == a.pid else (b, a)
    victim.send_signal(signal.SIGKILL)
    killed_at = time.time()
    assert await victim.wait_exit(5) == -signal.SIGKILL

    done = await run.wait_entries("done", total, 40)
    starts = await run.entries("stamp")
    assert sorted(entry["n"] for entry in done) == list(range(total))
    ended = {(e["pid"], e["n"]): e["at"] for e in done}
    runs = [(s["at"], ended.get((s["pid"], s["n"]), killed_at)) for s in starts]
    unfinished = [s for s in starts if (s["pid"], s["n"]) not in ended]
    assert all(s["pid"] == victim.pid for s in unfinished)
    assert first in unfinished  # it was killed mid-task, and ran again on the survivor
    assert any(e["n"] == first["n"] and e["pid"] == survivor.pid for e in done)

    def running_at(moment: float) -> int:
        return sum(1 for begun, end in runs if begun <= moment < end)

    most = max(running_at(begun) for begun, _ in runs)
    assert most <= 2, runs
    # The permit came back: after the lease, two ran at once again (both started after the kill).
    later = [(begun, end) for begun, end in runs if begun > killed_at]
    overlapping = [
        (x, y) for x, y in itertools.combinations(later, 2) if x[0] < y[1] and y[0] < x[1]
    ]
    assert overlapping, f"never two at once after the kill: {later}"
    first_pair = min(max(x[0], y[0]) for x, y in overlapping)
    print(
        f"\n{run.broker}: cap 2 held (max {most}); two at once again "
        f"{first_pair - killed_at:.2f}s after the kill (lease {LEASE}s)"
    )
