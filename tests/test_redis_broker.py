"""Redis specifics: key layout, crash recovery by sweep, multi-queue waits, connection count."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from conftest import running_worker, wait_until

from aioqueue import App, BrokerConnectionError
from aioqueue.brokers.redis import RedisBroker
from aioqueue.message import Message

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


def _body(app: App, tag: str, queue: str, priority: int | None = None) -> bytes:
    return app.codec.encode(Message(tag, "job", queue, (tag,), priority=priority))


def _count_round_trips(broker: RedisBroker, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the batcher's runs (one round trip each when nothing else is in flight)."""
    calls = [0]
    run = broker.batcher.run

    async def counted(stage: Any) -> Any:
        calls[0] += 1
        return await run(stage)

    monkeypatch.setattr(broker.batcher, "run", counted)
    return calls


async def test_one_fetch_reads_the_queues_in_order_in_one_round_trip(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listed queues are read first to last, each oldest first, the next one only while the
    fetch still wants more; empty queues on the way cost no round trip of their own."""
    async with app:
        broker = app.broker
        assert isinstance(broker, RedisBroker)
        queues = [f"q{i}" for i in range(20)]
        for tag in ("a1", "a2"):
            await broker.publish("q1", _body(app, tag, "q1"))
        for tag in ("b1", "b2", "b3"):
            await broker.publish("q17", _body(app, tag, "q17"))
        await broker.publish("q19", _body(app, "c1", "q19"))
        consumer = broker.consumer(queues, worker_id="ordered")
        await consumer.start()
        try:
            calls = _count_round_trips(broker, monkeypatch)
            taken = await consumer.fetch(4, 0)
            assert calls == [1]
            assert [(d.queue, app.codec.decode(d.body).id) for d in taken] == [
                ("q1", "a1"),
                ("q1", "a2"),
                ("q17", "b1"),
                ("q17", "b2"),
            ]
            assert await broker.queue_length("q17") == 1
            assert await broker.queue_length("q19") == 1  # not reached: the fetch was full
            rest = await consumer.fetch(10, 0)
            assert [app.codec.decode(d.body).id for d in rest] == ["b3", "c1"]
            for delivery in [*taken, *rest]:
                await delivery.ack()
        finally:
            await consumer.close()


async def test_one_fetch_keeps_each_queues_priorities_and_size_limit(
    app: App, raw: aioredis.Redis, key_prefix: str
) -> None:
    """Across queues in one call, a later queue's prioritised message still comes before its
    plain ones, and a body over the size limit on any queue is refused into that queue's dead
    letters (the worker records FAILURE from its prefix), never handed out."""
    async with app:
        broker = app.broker
        assert isinstance(broker, RedisBroker)
        await broker.publish("first", _body(app, "small", "first"))
        big = app.codec.encode(Message("huge", "job", "first", ("x" * 3000,)))
        await raw.lpush(f"{key_prefix}:{{first}}", big)
        await broker.publish("second", _body(app, "plain", "second"))
        await broker.publish("second", _body(app, "urgent", "second", priority=9))
        consumer = broker.consumer(["first", "second"], worker_id="mixed", max_size=2000)
        await consumer.start()
        try:
            taken = await consumer.fetch(10, 0)
            refused = [d for d in taken if d.size != len(d.body)]
            assert [(d.queue, d.size, big.startswith(d.body)) for d in refused] == [
                ("first", len(big), True)
            ]
            kept = [(d.queue, app.codec.decode(d.body).id) for d in taken if d not in refused]
            assert kept == [("first", "small"), ("second", "urgent"), ("second", "plain")]
            (dead,) = await broker.dead_letters("first")
            assert "max_message_size=2000" in dead.reason
            assert await broker.dead_letters("second") == []
            for delivery in taken:
                await delivery.ack()
        finally:
            await consumer.close()


async def test_a_lost_fetch_reply_is_reconciled_on_every_queue_it_read(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One call moved messages of two queues and its reply was lost: the next fetch adopts
    what sits in both processing lists, so nothing stays held by a worker that forgot it."""
    async with app:
        broker = app.broker
        assert isinstance(broker, RedisBroker)
        await broker.publish("one", _body(app, "x", "one"))
        await broker.publish("two", _body(app, "y", "two"))
        consumer = broker.consumer(["one", "two"], worker_id="forgetful")
        await consumer.start()
        run = broker.batcher.run

        async def reply_lost(stage: Any) -> Any:
            await run(stage)
            raise BrokerConnectionError("connection lost before the reply")

        try:
            monkeypatch.setattr(broker.batcher, "run", reply_lost)
            with pytest.raises(BrokerConnectionError):
                await consumer.fetch(10, 0)
            monkeypatch.setattr(broker.batcher, "run", run)
            assert await broker.queue_length("one") == await broker.queue_length("two") == 0
            adopted = await consumer.fetch(10, 0)
            assert sorted((d.queue, app.codec.decode(d.body).id) for d in adopted) == [
                ("one", "x"),
                ("two", "y"),
            ]
            for delivery in adopted:
                await delivery.ack()
        finally:
            await consumer.close()
