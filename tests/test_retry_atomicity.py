"""A retry replaces its delivery without losing the task or running it twice.

Redis swaps the message for its retry in one fenced script; RabbitMQ cannot, so the retry is
published (confirmed), RETRY recorded, then the original acked, and a redelivered original
whose retry is already recorded is dropped unrun. These tests put a worker in the state a crash
between those steps leaves behind.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from conftest import running_worker, wait_until

from aioqueue import App, Message, Outcome, States
from aioqueue.brokers.amqp import AmqpBroker
from aioqueue.brokers.redis import RedisBroker

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def redis_app(redis_url: str, key_prefix: str, redis_cleanup: None) -> AsyncIterator[App]:
    app = App("resend", broker=redis_url, key_prefix=key_prefix)
    yield app
    await app.close()


@pytest.fixture
async def amqp_app(
    amqp_url: str, redis_url: str, key_prefix: str, redis_cleanup: None
) -> AsyncIterator[App]:
    app = App(
        "resend-amqp",
        broker=amqp_url,
        backend=redis_url,
        key_prefix=key_prefix,
        amqp_delete_queues_on_close=True,
    )
    yield app
    await app.close()


async def test_redis_resend_swaps_the_message_in_one_step(
    redis_app: App, raw: aioredis.Redis, key_prefix: str
) -> None:
    app = redis_app
    async with app:
        broker = app.broker
        assert isinstance(broker, RedisBroker)
        await broker.publish("default", b"original")
        consumer = broker.consumer(["default"], worker_id="w1")
        await consumer.start()
        try:
            (delivery,) = await consumer.fetch(1, 0)
            eta = time.time() + 60
            await delivery.resend(b"the retry", eta)  # type: ignore[attr-defined]
            base = f"{key_prefix}:{{default}}"
            assert await raw.lrange(f"{base}:processing:w1", 0, -1) == []
            assert await raw.lrange(base, 0, -1) == []
            assert await raw.zrange(f"{base}:delayed", 0, -1, withscores=True) == [
                (b"the retry", pytest.approx(eta))
            ]
        finally:
            await consumer.close()


async def test_redis_resend_is_fenced_on_the_lease(
    redis_app: App, raw: aioredis.Redis, key_prefix: str
) -> None:
    """A worker whose message was swept to another worker re-sends nothing: the other worker
    now owns the task, and a second copy would run it twice."""
    app = redis_app
    async with app:
        broker = app.broker
        assert isinstance(broker, RedisBroker)
        await broker.publish("default", b"original")
        consumer = broker.consumer(["default"], worker_id="late")
        await consumer.start()
        try:
            (delivery,) = await consumer.fetch(1, 0)
            base = f"{key_prefix}:{{default}}"
            assert await raw.lrem(f"{base}:processing:late", -1, b"original") == 1
            await delivery.resend(b"the retry", time.time())  # type: ignore[attr-defined]
            assert await raw.zcard(f"{base}:delayed") == 0
            assert await raw.llen(base) == 0
        finally:
            await consumer.close()


def _original(app: App, task_name: str, retries: int) -> bytes:
    message = Message(
        id="guarded-1",
        task=task_name,
        queue="default",
        headers={"retries": retries} if retries else {},
        sent_at=time.time(),
    )
    return app.codec.encode(message)


@pytest.mark.parametrize(
    ("recorded_retries", "copy_retries", "runs_expected"),
    [
        (1, 0, 0),  # the original came back after its retry was sent: dropped unrun
        (None, 0, 1),  # nothing recorded: the original runs again (at least once)
        (1, 1, 1),  # the retry itself came back (its worker died): it runs
    ],
)
async def test_amqp_redelivered_original_of_a_sent_retry_is_not_run(
    amqp_app: App, recorded_retries: int | None, copy_retries: int, runs_expected: int
) -> None:
    app = amqp_app
    runs: Counter[str] = Counter()

    @app.task
    async def guarded() -> str:
        runs["g"] += 1
        return "ran"

    async with app:
        broker = await app.ready_broker()
        backend = await app.ready_backend()
        assert isinstance(broker, AmqpBroker)
        if recorded_retries is not None:
            state = Outcome("guarded-1", States.RETRY, retries=recorded_retries, eta=time.time())
            await backend.store_state("guarded-1", app.codec.encode_outcome(state), ttl=60)
        # what a crash between the retry's publish and the original's ack leaves behind: the
        # original, redelivered (attempt 2)
        await broker.republish("default", _original(app, guarded.name, copy_retries), attempt=2)
        async with running_worker(app) as worker:

            async def settled() -> bool:
                return worker.processed == 1

            await wait_until(settled)
            assert await broker.queue_length("default") == 0
        assert runs["g"] == runs_expected
        expected_state = States.SUCCESS if runs_expected else States.RETRY
        assert await app.AsyncResult("guarded-1").state() == expected_state
