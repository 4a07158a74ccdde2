"""Redis priorities: a prioritised message keeps its level through give-back, close, sweep,
reconcile and delays; dead letters and queue_length see it; plain queues are untouched."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from conftest import wait_until

from aioqueue import App
from aioqueue.brokers.redis import RedisBroker
from aioqueue.message import Message, priority_of

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def app(redis_url: str, key_prefix: str, redis_cleanup: None) -> App:
    return App(
        "prio",
        broker=redis_url,
        key_prefix=key_prefix,
        worker_heartbeat_interval=0.1,
        worker_heartbeat_ttl=0.5,
    )


def body_of(app: App, tag: str, priority: int | None) -> bytes:
    message = Message(id=tag, task="job", queue="default", args=(tag,), priority=priority)
    return app.codec.encode(message)


def broker_of(app: App) -> RedisBroker:
    assert isinstance(app.broker, RedisBroker)
    return app.broker


async def test_keys_and_queue_length(app: App, raw: aioredis.Redis, key_prefix: str) -> None:
    async with app:
        broker = broker_of(app)
        await broker.publish("default", body_of(app, "plain", None))
        await broker.publish("default", body_of(app, "zero", 0))
        await broker.publish("default", body_of(app, "seven", 7))
        await broker.publish_many([("default", body_of(app, "two", 2), None)])
        base = f"{key_prefix}:{{default}}"
        assert await raw.llen(base) == 2  # no priority and priority 0 share the plain list
        assert await raw.llen(f"{base}:priority:7") == 1
        assert await raw.llen(f"{base}:priority:2") == 1
        assert await broker.queue_length("default") == 4


async def test_give_back_close_and_sweep_keep_the_level(
    app: App, raw: aioredis.Redis, key_prefix: str
) -> None:
    base = f"{key_prefix}:{{default}}"
    async with app:
        broker = broker_of(app)
        await broker.publish("default", body_of(app, "plain", None))
        await broker.publish("default", body_of(app, "high", 8))
        consumer: Any = broker.consumer(["default"], worker_id="one")
        await consumer.start()
        try:
            (delivery,) = await consumer.fetch(1, 0)
            assert priority_of(delivery.body) == 8
            await delivery.requeue(count_attempt=True)  # ran, no outcome: attempt raised
            (stamped,) = await raw.lrange(f"{base}:priority:8", 0, -1)
            assert stamped.startswith(b'{"attempt":2,"priority":8,')
            assert priority_of(stamped) == 8
            (again,) = await consumer.fetch(1, 0)
            assert again.attempt == 2 and priority_of(again.body) == 8
        finally:
            await consumer.close()  # still unsettled: returned to its level, attempt raised
        assert priority_of((await raw.lrange(f"{base}:priority:8", 0, -1))[0]) == 8
        assert await raw.llen(base) == 1

        # a dead worker's processing list is swept back to the levels by a live one
        dead: Any = broker.consumer(["default"], worker_id="dead")
        await dead.start()
        taken = await dead.fetch(2, 0)
        assert [priority_of(d.body) for d in taken] == [8, 0]
        dead._lease.stop()  # as if the process died: no more heartbeats
        dead._heartbeat.cancel()
        await dead._mover.stop()
        await raw.delete(f"{base}:alive:dead")
        live: Any = broker.consumer(["default"], worker_id="live")
        await live.start()  # its first heartbeat sweeps
        try:
            assert await raw.llen(f"{base}:priority:8") == 1
            assert await raw.llen(base) == 1
            got = await live.fetch(2, 0)
            assert [priority_of(d.body) for d in got] == [8, 0]
            assert [d.attempt for d in got] == [4, 2]
            for delivery in got:
                await delivery.ack()
        finally:
            await live.close()
            await dead.close()


async def test_dead_letter_and_reconcile(app: App, raw: aioredis.Redis, key_prefix: str) -> None:
    base = f"{key_prefix}:{{default}}"
    async with app:
        broker = broker_of(app)
        consumer: Any = broker.consumer(["default"], worker_id="w")
        await consumer.start()
        try:
            # a fetch whose reply was lost: the message sits in our processing list unknown
            body = body_of(app, "lost", 6)
            await raw.lpush(f"{base}:processing:w", body)
            consumer._dirty.add("default")
            (adopted,) = await consumer.fetch(1, 0)
            assert adopted.body == body
            await adopted.dead_letter("bad input")
            (dead,) = await broker.dead_letters("default")
            assert dead.body == body and dead.reason == "bad input"
            assert await broker.queue_length("default") == 0
        finally:
            await consumer.close()


async def test_delayed_prioritised_message_lands_in_its_level(
    app: App, raw: aioredis.Redis, key_prefix: str
) -> None:
    base = f"{key_prefix}:{{default}}"
    async with app:
        broker = broker_of(app)
        await broker.publish("default", body_of(app, "later", 5), eta=time.time() + 0.2)
        consumer: Any = broker.consumer(["default"], worker_id="w")
        await consumer.start()
        try:

            async def moved() -> bool:
                return bool(await raw.llen(f"{base}:priority:5"))

            await wait_until(moved)
            assert await raw.llen(base) == 0
            (delivery,) = await consumer.fetch(1, 0)
            assert priority_of(delivery.body) == 5
            await delivery.ack()
        finally:
            await consumer.close()


async def test_a_plain_queue_never_touches_priority_keys(
    app: App, raw: aioredis.Redis, key_prefix: str
) -> None:
    async with app:
        broker = broker_of(app)
        await broker.publish_many([("default", body_of(app, str(i), None), None) for i in range(5)])
        consumer = broker.consumer(["default"], worker_id="w")
        await consumer.start()
        try:
            got = await consumer.fetch(5, 0)
            for delivery in got:
                await delivery.requeue()
        finally:
            await consumer.close()
        keys = [key async for key in raw.scan_iter(match=f"{key_prefix}*priority*")]
        assert keys == []


async def test_the_marker_goes_when_the_levels_are_empty(
    app: App, raw: aioredis.Redis, key_prefix: str
) -> None:
    """A plain fetch looks only at the marker: it must exist while a level holds a message and
    go once they are all drained, so the queue is plain again."""
    marker = f"{key_prefix}:{{default}}:priorities"
    async with app:
        broker = broker_of(app)
        await broker.publish("default", body_of(app, "high", 3))
        await broker.publish("default", body_of(app, "plain", None))
        assert await raw.exists(marker)
        consumer = broker.consumer(["default"], worker_id="w")
        await consumer.start()
        try:
            (first,) = await consumer.fetch(1, 0)
            assert priority_of(first.body) == 3
            assert not await raw.exists(marker)  # that fetch emptied the levels
            await first.requeue()  # given back to its level: marked again
            assert await raw.exists(marker)
            got = await consumer.fetch(2, 0)
            assert [priority_of(d.body) for d in got] == [3, 0]
            for delivery in got:
                await delivery.ack()
        finally:
            await consumer.close()
