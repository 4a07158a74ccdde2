"""RabbitMQ holds delayed messages in delay buckets (issue 8, item 1), against the real server.

Through the broker seam: bodies are envelopes made with ``app.codec.encode(Message(eta=...))``
and published with ``publish(queue, body, eta=)`` / ``publish_many``; a consumer records when
each message reached it. Every test has a key prefix of its own; the fixture deletes every
queue that prefix can have (work, dead, all delay buckets) afterwards, also those of an app that
closed without deleting (the survival test).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import aiormq
import pytest
from conftest import AMQP_URL, require_server, running_worker, wait_until

from aioqueue import App, BrokerError
from aioqueue.brokers.amqp import AmqpBroker, delay_bucket
from aioqueue.brokers.amqp_consumer import DELAY_BUCKETS_MS, ETA_HEADER, MIN_DELAY
from aioqueue.brokers.base import Consumer
from aioqueue.message import Message

pytestmark = pytest.mark.timeout(60)

EARLY = 0.05
"""A message may reach a consumer at most this long before its eta."""

AppMaker = Callable[..., App]


@pytest.fixture
async def make_app(key_prefix: str) -> AsyncIterator[AppMaker]:
    """Apps on RabbitMQ under the test's prefix; afterwards every queue of the prefix is gone."""
    require_server(AMQP_URL, "RabbitMQ")
    apps: list[App] = []

    def factory(**config: Any) -> App:
        config.setdefault("broker", AMQP_URL)
        config.setdefault("backend", "memory://")
        config.setdefault("key_prefix", key_prefix)
        config.setdefault("amqp_delete_queues_on_close", True)
        app = App("amqp-delays", **config)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        await app.close()
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        base = f"{key_prefix}.default"
        for name in [f"{base}.delay.{ms}ms" for ms in DELAY_BUCKETS_MS] + [base, f"{base}.dead"]:
            await channel.queue_delete(name)
        await channel.exchange_delete(f"{key_prefix}.dead")
    finally:
        await connection.close()


async def amqp_broker(app: App) -> AmqpBroker:
    broker = await app.ready_broker()
    assert isinstance(broker, AmqpBroker)
    return broker


def envelope(app: App, eta: float | None, label: str = "") -> bytes:
    message = Message(
        id=label or uuid.uuid4().hex, task="t", queue="default", eta=eta, sent_at=time.time()
    )
    return app.codec.encode(message)


class Receiver:
    """A consumer that acks everything and notes when each body reached it."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.got: list[tuple[float, bytes, int]] = []
        self.arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Receiver:
        await self.consumer.start()
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.consumer.close()

    async def _run(self) -> None:
        while True:
            for delivery in await self.consumer.fetch(500, timeout=0.5):
                self.got.append((time.time(), delivery.body, delivery.attempt))
                await delivery.ack()
                self.arrived.set()

    async def wait_for(self, count: int, timeout: float) -> None:
        async def enough() -> bool:
            return len(self.got) >= count

        await wait_until(enough, timeout=timeout)


def receiver(broker: AmqpBroker, prefetch: int = 100) -> Receiver:
    return Receiver(broker.consumer(["default"], worker_id=uuid.uuid4().hex, prefetch=prefetch))


# -- bucket choice ------------------------------------------------------------------------


def test_the_bucket_is_the_largest_not_longer_than_the_delay() -> None:
    assert delay_bucket(MIN_DELAY) == DELAY_BUCKETS_MS[0] == 31
    assert delay_bucket(0.999) == 500
    assert delay_bucket(1.0) == 1000
    assert delay_bucket(3.9) == 2000
    assert delay_bucket(3600.0) == 2048000
    assert delay_bucket(10**9) == DELAY_BUCKETS_MS[-1] == 65536000


# -- delivery time --------------------------------------------------------------------------


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_delayed_message_waits_in_rabbitmq_until_its_eta(
    make_app: AppMaker, queue_type: str
) -> None:
    app = make_app(amqp_queue_type=queue_type)
    async with app:
        broker = await amqp_broker(app)
        async with receiver(broker) as got:
            eta = time.time() + 1.5
            await broker.publish("default", envelope(app, eta), eta=eta)
            # it waits in a bucket, not in the work queue and not unacked in a consumer
            assert await broker.queue_length("default") == 0
            assert got.got == []
            await got.wait_for(1, timeout=10)
        arrived = got.got[0][0]
        assert eta - EARLY <= arrived < eta + 1.0, arrived - eta


async def test_a_short_delay_does_not_block_a_longer_one_sent_before_it(
    make_app: AppMaker,
) -> None:
    app = make_app()
    async with app:
        broker = await amqp_broker(app)
        async with receiver(broker) as got:
            now = time.time()
            late, soon = now + 3.0, now + 1.0
            await broker.publish("default", envelope(app, late, "late"), eta=late)
            await broker.publish("default", envelope(app, soon, "soon"), eta=soon)
            await got.wait_for(2, timeout=10)
        order = [app.codec.decode(body).id for _, body, _ in got.got]
        assert order == ["soon", "late"]
        (soon_at, _, _), (late_at, _, _) = got.got
        assert soon - EARLY <= soon_at < soon + 1.0, soon_at - soon
        assert late - EARLY <= late_at < late + 1.0, late_at - late


async def test_a_delayed_message_survives_every_consumer_and_client_closing(
    make_app: AppMaker,
) -> None:
    """Nobody holds it while it waits: the sender and the only consumer close, a new process
    (a new app on the same prefix) starts later and gets it once, on time."""
    first = make_app(amqp_delete_queues_on_close=False)
    async with first:
        broker = await amqp_broker(first)
        async with receiver(broker) as got:
            eta = time.time() + 2.0
            await broker.publish("default", envelope(first, eta), eta=eta)
            await asyncio.sleep(0.3)  # the consumer is up and has nothing
            assert got.got == []
    second = make_app()
    async with second:
        broker = await amqp_broker(second)
        async with receiver(broker) as got:
            await got.wait_for(1, timeout=10)
            await asyncio.sleep(0.5)  # a duplicate would show up here
        assert len(got.got) == 1
        assert eta - EARLY <= got.got[0][0] < eta + 1.0


async def test_the_attempt_travels_through_the_buckets(make_app: AppMaker) -> None:
    """A delayed message given back untouched (republish with its eta) goes to a bucket and
    keeps its attempt across the hops."""
    app = make_app()
    async with app:
        broker = await amqp_broker(app)
        async with receiver(broker) as got:
            eta = time.time() + 1.3
            await broker.republish("default", envelope(app, eta), 3, eta)
            assert await broker.queue_length("default") == 0
            await got.wait_for(1, timeout=10)
        arrived, _, attempt = got.got[0]
        assert attempt == 3
        assert arrived >= eta - EARLY


async def test_a_redelivered_message_not_due_is_rerouted_with_its_attempt_raised(
    make_app: AppMaker,
) -> None:
    """A delayed message that a consumer died holding comes back flagged redelivered: the next
    consumer sends it on to a bucket (it is not due) with the attempt counted, in one step."""
    app = make_app()
    async with app:
        broker = await amqp_broker(app)
        await broker.declare("default")
        eta = time.time() + 1.5
        connection = await aio_pika.connect(AMQP_URL)
        try:
            channel = await connection.channel()
            await channel.default_exchange.publish(
                aio_pika.Message(
                    envelope(app, eta), delivery_mode=2, headers={ETA_HEADER: int(eta * 1000) + 1}
                ),
                routing_key=broker.names("default").queue,
            )
            queue = await channel.get_queue(broker.names("default").queue, ensure=False)
            held = await queue.get(no_ack=False, timeout=5)
            assert held is not None
            await channel.close()  # never acked: RabbitMQ puts it back, redelivered
        finally:
            await connection.close()
        async with receiver(broker) as got:
            await got.wait_for(1, timeout=10)
        arrived, _, attempt = got.got[0]
        assert attempt == 2
        assert eta - EARLY <= arrived < eta + 1.0


async def test_publish_many_with_mixed_etas(make_app: AppMaker) -> None:
    app = make_app()
    async with app:
        broker = await amqp_broker(app)
        async with receiver(broker) as got:
            now = time.time()
            etas = {"plain": None, "later": now + 1.2, "past": now - 5, "tiny": now + 0.01}
            await broker.publish_many(
                [("default", envelope(app, eta, label), eta) for label, eta in etas.items()]
            )
            await got.wait_for(3, timeout=5)
            first = {app.codec.decode(body).id: at for at, body, _ in got.got}
            assert set(first) == {"plain", "past", "tiny"}
            assert all(at - now < 1.0 for at in first.values())
            await got.wait_for(4, timeout=10)
        at, body, _ = got.got[3]
        later = etas["later"]
        assert later is not None
        assert app.codec.decode(body).id == "later"
        assert later - EARLY <= at < later + 1.0


async def test_a_thousand_messages_due_in_the_same_second(make_app: AppMaker) -> None:
    """Precision: p50/p99 lateness at the consumer for 1,000 etas spread over one second."""
    app = make_app()
    async with app:
        broker = await amqp_broker(app)
        start = time.time() + 2.0
        etas = {f"m{i}": start + i / 1000 for i in range(1000)}
        bodies = {label: envelope(app, eta, label) for label, eta in etas.items()}
        async with receiver(broker, prefetch=200) as got:
            await broker.publish_many(
                [("default", bodies[label], eta) for label, eta in etas.items()]
            )
            await got.wait_for(1000, timeout=20)
        lateness = sorted(at - etas[app.codec.decode(body).id] for at, body, _ in got.got)
        p50 = statistics.median(lateness)
        p99 = lateness[989]
        print(
            f"\nAMQP delay buckets, 1,000 etas within one second: lateness min "
            f"{lateness[0] * 1000:.1f} ms, p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
            f"max {lateness[-1] * 1000:.1f} ms"
        )
        assert len({body for _, body, _ in got.got}) == 1000
        assert lateness[0] >= -EARLY
        assert p99 < 2.0


async def test_a_message_that_cannot_be_rerouted_is_handed_over_not_lost(
    make_app: AppMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If publishing to the next bucket fails, the consumer hands the message over after all
    (the worker then parks it until its eta): early, never lost, never stuck unacked."""
    app = make_app()
    async with app:
        broker = await amqp_broker(app)
        eta = time.time() + 1.5
        await broker.publish("default", envelope(app, eta), eta=eta)

        async def refuse(*_: object, **__: object) -> None:
            raise BrokerError("refused by the test")

        monkeypatch.setattr(broker, "publish_delayed", refuse)
        consumer = broker.consumer(["default"], worker_id="w", prefetch=1)
        await consumer.start()
        try:
            got = await consumer.fetch(1, timeout=5)
            assert len(got) == 1
            assert time.time() < eta  # out of the 1 s bucket, 0.5 s early: the worker parks it
            assert app.codec.decode(got[0].body).eta == eta
            await got[0].ack()
        finally:
            await consumer.close()


# -- the worker -----------------------------------------------------------------------------


async def test_a_worker_runs_a_delayed_task_on_time_without_parking_it(
    make_app: AppMaker,
) -> None:
    """The worker never holds the delayed message (nothing parked, its one slot free for other
    work meanwhile) and runs it at its eta."""
    app = make_app()
    ran_at: dict[str, float] = {}

    @app.task
    async def stamp(label: str) -> None:
        ran_at[label] = time.time()

    async with app, running_worker(app, concurrency=1) as worker:
        broker = await amqp_broker(app)
        eta = time.time() + 1.5
        body = app.codec.encode(
            Message(id="d", task=stamp.name, queue="default", args=("later",), eta=eta)
        )
        await broker.publish("default", body, eta=eta)
        await stamp.send("now")

        async def ran_now() -> bool:
            return "now" in ran_at

        await wait_until(ran_now)
        assert worker.parked == 0
        assert ran_at["now"] < eta

        async def ran_later() -> bool:
            assert worker.parked == 0
            return "later" in ran_at

        await wait_until(ran_later, timeout=10)
        assert eta <= ran_at["later"] < eta + 1.0


# -- cleanup --------------------------------------------------------------------------------


async def test_delete_queues_on_close_deletes_the_delay_buckets(make_app: AppMaker) -> None:
    app = make_app()
    async with app:
        broker = await amqp_broker(app)
        eta = time.time() + 60
        await broker.publish("default", envelope(app, eta), eta=eta)
        bucket = broker.names("default").delay(delay_bucket(eta - time.time()))
        assert bucket.endswith(".delay.32000ms")
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await channel.declare_queue(bucket, passive=True)
    finally:
        await connection.close()
