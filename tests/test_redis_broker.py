"""Redis specifics: key layout, crash recovery by sweep, multi-queue waits, connection count."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from conftest import running_worker, wait_until

from aioqueue import App
from aioqueue.brokers.redis import RedisBroker

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def app(redis_url: str, key_prefix: str, redis_cleanup: None) -> App:
    return App(
        "redis-specific",
        broker=redis_url,
        key_prefix=key_prefix,
        worker_heartbeat_interval=0.1,
        worker_heartbeat_ttl=0.5,
    )


async def test_keys_are_hash_tagged_per_queue(
    app: App, raw: aioredis.Redis, key_prefix: str
) -> None:
    @app.task(queue="emails")
    async def send_mail(to: str) -> str:
        return to

    async with app:
        await send_mail.send("a@example.com")
        assert await raw.llen(f"{key_prefix}:{{emails}}") == 1
        async with running_worker(app, queues=["emails"]) as worker:
            processing = f"{key_prefix}:{{emails}}:processing:{worker.id}"
            assert await raw.sismember(f"{key_prefix}:{{emails}}:workers", worker.id)
            assert await raw.exists(f"{key_prefix}:{{emails}}:alive:{worker.id}")
            result = await send_mail.send("b@example.com")
            assert await result.get(timeout=5) == "b@example.com"

            async def acked() -> bool:
                return await raw.llen(processing) == 0

            await wait_until(acked)
        # a clean stop leaves no membership or heartbeat behind
        assert not await raw.sismember(f"{key_prefix}:{{emails}}:workers", worker.id)
        assert await raw.llen(f"{key_prefix}:{{emails}}") == 0


async def test_dead_workers_messages_return_with_attempt_raised(app: App) -> None:
    @app.task
    async def job(n: int) -> int:
        return n

    async with app:
        await job.send_many([(1,), (2,)])
        broker = app.broker
        assert isinstance(broker, RedisBroker)
        doomed = broker.consumer(["default"], worker_id="doomed")
        await doomed.start()
        taken = await doomed.fetch(2, 0)
        assert [d.attempt for d in taken] == [1, 1]
        # the worker "dies": no more heartbeats, no clean close
        doomed._heartbeat.cancel()  # type: ignore[attr-defined]
        doomed._lease.stop()  # type: ignore[attr-defined]
        assert await broker.queue_length("default") == 0

        survivor = broker.consumer(["default"], worker_id="survivor")
        await survivor.start()

        async def returned() -> bool:
            return await broker.queue_length("default") == 2

        await wait_until(returned, timeout=5)
        again = await survivor.fetch(10, 0)
        assert sorted(d.attempt for d in again) == [2, 2]
        assert [app.codec.decode(d.body).args for d in again] == [(1,), (2,)]  # order kept
        for delivery in again:
            await delivery.ack()
        await survivor.close()


async def test_multiple_queues_wake_on_any(app: App) -> None:
    @app.task(queue="low")
    async def low() -> str:
        return "low"

    @app.task(queue="high")
    async def high() -> str:
        return "high"

    async with app, running_worker(app, queues=["high", "low"]):
        results = [await low.send(), await high.send(), await low.send()]
        assert [await r.get(timeout=5) for r in results] == ["low", "high", "low"]


async def test_waiters_share_one_connection(app: App, raw: aioredis.Redis) -> None:
    @app.task
    async def echo(n: int) -> int:
        await asyncio.sleep(0.05)
        return n

    async def result_connections() -> int:
        clients = await raw.client_list()
        return sum(1 for c in clients if c["name"] == "aioqueue:redis-specific:results")

    async with app, running_worker(app, concurrency=200):
        baseline = await result_connections()

        async def one(n: int) -> int:
            value: int = await (await echo.send(n)).get(timeout=20)
            return value

        values = await asyncio.gather(*(one(n) for n in range(500)))
        assert values == list(range(500))
        assert await result_connections() <= max(baseline, 2)


async def test_foreign_process_handle_wakes_by_subscription(
    app: App, raw: aioredis.Redis, redis_url: str, key_prefix: str
) -> None:
    """A handle built from an id in another app (as another process would) is pushed too."""
    release = asyncio.Event()

    @app.task
    async def gated() -> str:
        await release.wait()
        return "opened"

    other = App("other-process", broker=redis_url, key_prefix=key_prefix)
    async with app, other, running_worker(app):
        result = await gated.send()
        waiting = asyncio.create_task(other.AsyncResult(result.id).get(timeout=10))
        channel = f"{key_prefix}:done:{result.id}"

        async def subscribed() -> bool:
            counts = dict(await raw.pubsub_numsub(channel))
            return bool(counts.get(channel.encode(), 0))

        await wait_until(subscribed)  # the wait is parked on its subscription, not on a read
        release.set()
        assert await waiting == "opened"
