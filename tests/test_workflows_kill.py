"""A chord whose worker is SIGKILLed while its members run: the callback still runs once.

Two real ``aioqueue worker cli_app:app`` processes (tests/workers.py) on Redis and on RabbitMQ,
results on Redis. Worker A takes every member of a six-member chord (``cli_app.hold``, each on a
gate of its own); three gates open and those members finish on A, then A is SIGKILLed while the
other three still run. Their messages come back (Redis: B's sweep once A's 1 s lease lapses;
RabbitMQ: at once, the connection dropped), B runs them, and the chord's callback
(``cli_app.collect``) runs exactly once, with every member's result, in order. Nothing waits on
a fixed sleep: every wait polls a condition with a deadline.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from cli_app import record_key
from conftest import AMQP_URL, REDIS_URL, delete_prefixed, require_server, wait_until
from test_cli_kill_delays import delete_amqp_queues
from workers import WorkerSet, worker_env

from aioqueue import App, chord, group

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


@pytest.fixture(params=["redis", "amqp"])
def broker(request: pytest.FixtureRequest) -> str:
    require_server(REDIS_URL, "Redis")
    if request.param == "amqp":
        require_server(AMQP_URL, "RabbitMQ")
    return str(request.param)


@pytest.fixture
async def setup(
    broker: str, key_prefix: str, tmp_path: Path
) -> AsyncIterator[tuple[WorkerSet, App, aioredis.Redis]]:
    url = AMQP_URL if broker == "amqp" else REDIS_URL
    workers = WorkerSet(worker_env(REDIS_URL, key_prefix, broker_url=url), tmp_path)
    rdb = aioredis.Redis.from_url(REDIS_URL)
    client = App("client", broker=url, backend=REDIS_URL, key_prefix=key_prefix)
    try:
        async with client:
            yield workers, client, rdb
    finally:
        await workers.close()
        await rdb.aclose()
        await delete_prefixed(REDIS_URL, key_prefix)
        if broker == "amqp":
            await delete_amqp_queues(key_prefix)


async def test_chord_callback_runs_once_when_its_worker_is_killed(
    setup: tuple[WorkerSet, App, aioredis.Redis], key_prefix: str
) -> None:
    workers, client, rdb = setup
    gates = [uuid.uuid4().hex for _ in range(6)]
    done = uuid.uuid4().hex

    async def runs(name: str) -> list[dict[str, Any]]:
        return [
            orjson.loads(e) for e in await rdb.lrange(record_key("stamp", name, key_prefix), 0, -1)
        ]

    async def open_gate(gate: str) -> None:
        await rdb.set(record_key("gate", gate, key_prefix), b"1")

    a = await workers.start("--concurrency", "10", "--processes", "1", name="A")
    members = group(client.signature("cli_app.hold", [gate]) for gate in gates)
    result = await chord(members, client.signature("cli_app.collect", [done])).send()

    async def all_started() -> bool:
        return all([await runs(gate) for gate in gates])

    await wait_until(all_started, timeout=15)
    for gate in gates[:3]:
        await open_gate(gate)

    async def first_three_counted() -> bool:
        keys = [key async for key in rdb.scan_iter(match=f"{key_prefix}:chord:*")]
        return len(keys) == 1 and await rdb.scard(keys[0]) == 3

    b = await workers.start("--concurrency", "10", "--processes", "1", name="B")
    await wait_until(first_three_counted, timeout=15)
    a.send_signal(signal.SIGKILL)
    assert await a.wait_exit(5) == -signal.SIGKILL
    for gate in gates[3:]:
        await open_gate(gate)

    values = await result.get(timeout=30)
    assert values[:3] == [a.pid] * 3 and values[3:] == [b.pid] * 3
    assert len(await runs(done)) == 1
    for gate in gates[3:]:  # these ran twice: on A (killed), then on B
        assert [run["pid"] for run in await runs(gate)] == [a.pid, b.pid]

    async def drained() -> bool:
        broker = await client.ready_broker()
        return await broker.queue_length("default") == 0

    await wait_until(drained, timeout=10)
    assert len(await runs(done)) == 1
