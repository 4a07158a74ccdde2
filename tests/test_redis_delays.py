"""Delays held broker-side (issue 8, item 1): Redis keeps a message with a future eta in a sorted
set per queue and a live consumer moves it to the list when due; the memory broker does the same
in process. Tested through the broker seam (``publish(..., eta=)``), and through a worker.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from typing import Any, Protocol

import pytest
from conftest import AppFactory, running_worker, wait_until

from aioqueue import App
from aioqueue.brokers import _redis_delays
from aioqueue.brokers import redis as redis_broker
from aioqueue.brokers.base import Consumer, Delivery
from aioqueue.message import Message

pytestmark = pytest.mark.timeout(60)

BOTH = pytest.mark.parametrize("transport", ["memory", "redis"], indirect=True)
REDIS = pytest.mark.parametrize("transport", ["redis"], indirect=True)


class _Delays(Protocol):
    async def publish(self, queue: str, body: bytes, *, eta: float | None = None) -> None: ...
    async def publish_many(self, items: Any) -> None: ...
    async def queue_length(self, queue: str) -> int: ...
    async def delayed_length(self, queue: str) -> int: ...
    def consumer(self, queues: Any, *, worker_id: str, max_size: int | None = None) -> Consumer: ...


async def _broker(app: App) -> _Delays:
    broker: Any = await app.ready_broker()
    return broker  # type: ignore[no-any-return]


def _body(app: App, task: str = "t.job", *args: Any, eta: float | None = None) -> bytes:
    message = Message(
        id=uuid.uuid4().hex,
        task=task,
        queue="default",
        args=args,
        reply_to=app.backend.reply_to(),
        sent_at=time.time(),
        eta=eta,
    )
    return app.codec.encode(message)


async def _consumer(broker: _Delays, worker_id: str = "w1") -> Consumer:
    consumer = broker.consumer(["default"], worker_id=worker_id)
    await consumer.start()
    return consumer


async def _true(value: bool) -> bool:
    return value


@BOTH
async def test_a_delayed_message_is_not_fetchable_before_its_eta_and_is_after(
    make_app: AppFactory,
) -> None:
    app = make_app()
    async with app:
        broker = await _broker(app)
        consumer = await _consumer(broker)
        try:
            eta = time.time() + 1.0
            body = _body(app, eta=eta)
            await broker.publish("default", body, eta=eta)
            assert await consumer.fetch(10, 0) == []
            assert await consumer.fetch(10, 0.3) == []  # a wait that ends before the eta
            assert await broker.delayed_length("default") == 1
            assert await broker.queue_length("default") == 0
            (delivery,) = await consumer.fetch(10, 5.0)  # the waiting fetch wakes when due
            got_at = time.time()
            assert delivery.body == body and delivery.attempt == 1
            assert eta <= got_at < eta + 1.0
            assert await broker.delayed_length("default") == 0
            await delivery.ack()
        finally:
            await consumer.close()


@BOTH
async def test_due_messages_come_earliest_first_ahead_of_the_queue(make_app: AppFactory) -> None:
    """Due messages go to the front (they already waited their delay), earliest eta first."""
    app = make_app()
    async with app:
        broker = await _broker(app)
        base = time.time() + 0.5
        bodies = {name: _body(app, "t.job", name) for name in ("c", "a", "b", "now", "past")}
        await broker.publish("default", bodies["now"])
        await broker.publish_many(
            [
                ("default", bodies["c"], base + 0.3),
                ("default", bodies["a"], base + 0.1),
                ("default", bodies["past"], time.time() - 5),  # due already: sent as usual
                ("default", bodies["b"], base + 0.2),
            ]
        )
        assert await broker.delayed_length("default") == 3
        assert await broker.queue_length("default") == 2
        await asyncio.sleep(base + 0.3 - time.time())  # all three are due now
        consumer = await _consumer(broker)
        try:
            if isinstance(broker, redis_broker.RedisBroker):  # the mover moves them at start
                await wait_until(lambda: _delayed_is(broker, 0), timeout=5)
            got = await consumer.fetch(10, 0)
            names = {body: name for name, body in bodies.items()}
            assert [names[d.body] for d in got] == ["a", "b", "c", "now", "past"]
        finally:
            await consumer.close()


async def _delayed_is(broker: _Delays, count: int) -> bool:
    return await broker.delayed_length("default") == count


@REDIS
async def test_a_delayed_message_survives_every_consumer_stopping(make_app: AppFactory) -> None:
    """It waits in Redis, held by no worker: nobody runs it while none is alive, nobody runs it
    twice, and the next consumer to start delivers it as a first attempt."""
    app = make_app()
    async with app:
        broker = await _broker(app)
        first = await _consumer(broker, "first")
        eta = time.time() + 0.8
        body = _body(app, eta=eta)
        await broker.publish("default", body, eta=eta)
        assert await first.fetch(10, 0.2) == []
        await first.close()
        await asyncio.sleep(eta + 0.5 - time.time())  # due, with no consumer alive
        assert await broker.delayed_length("default") == 1
        assert await broker.queue_length("default") == 0
        second = await _consumer(broker, "second")
        try:
            (delivery,) = await second.fetch(10, 5.0)
            assert delivery.body == body and delivery.attempt == 1
            await delivery.ack()
            assert await second.fetch(10, 0.5) == []
        finally:
            await second.close()


@REDIS
async def test_an_earlier_message_wakes_a_sleeping_mover(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mover sleeps until the next eta; a wake notice brings an earlier one forward, so
    it is on time even when the sleep cap is long."""
    monkeypatch.setattr(_redis_delays, "MAX_DELAY_SLEEP", 30.0)
    app = make_app()
    async with app:
        broker = await _broker(app)
        await broker.publish("default", _body(app), eta=time.time() + 60)
        consumer = await _consumer(broker)
        try:
            assert await consumer.fetch(10, 0.3) == []  # the mover is asleep for 60 s now
            eta = time.time() + 0.3
            body = _body(app, eta=eta)
            await broker.publish("default", body, eta=eta)
            (delivery,) = await consumer.fetch(10, 5.0)
            assert delivery.body == body
            assert time.time() - eta < 0.5
        finally:
            await consumer.close()


@REDIS
async def test_a_thousand_messages_due_in_one_second_are_all_delivered_on_time(
    make_app: AppFactory,
) -> None:
    app = make_app()
    async with app:
        broker = await _broker(app)
        consumers = [await _consumer(broker, f"w{i}") for i in range(2)]
        try:
            start = time.time() + 1.5
            etas: dict[bytes, float] = {}
            for i in range(1000):
                eta = start + i / 1000
                etas[_body(app, "t.job", i, eta=eta)] = eta
            await broker.publish_many([("default", body, eta) for body, eta in etas.items()])
            lateness: dict[bytes, float] = {}

            async def drain(consumer: Consumer) -> None:
                while len(lateness) < len(etas):
                    deliveries: list[Delivery] = await consumer.fetch(100, 0.5)
                    now = time.time()
                    for delivery in deliveries:
                        assert delivery.body not in lateness, "delivered twice"
                        lateness[delivery.body] = now - etas[delivery.body]
                        await delivery.ack()

            async with asyncio.timeout(20):
                await asyncio.gather(*(drain(consumer) for consumer in consumers))
            late = sorted(lateness.values())
            p50, p99 = statistics.median(late), late[int(len(late) * 0.99) - 1]
            print(
                f"\nredis delay lateness over 1000 due in 1 s: p50={p50:.4f}s p99={p99:.4f}s "
                f"max={late[-1]:.4f}s"
            )
            assert len(lateness) == 1000
            assert late[0] >= 0, "delivered before its eta"
            assert p99 < 1.5
        finally:
            for consumer in consumers:
                await consumer.close()


@REDIS
async def test_ten_thousand_waiting_messages_do_not_make_a_consumer_spin(
    make_app: AppFactory,
) -> None:
    app = make_app()
    async with app:
        broker = await _broker(app)
        later = time.time() + 30
        await broker.publish_many(
            [("default", _body(app, "t.job", i), later + i / 10000) for i in range(10000)]
        )
        assert await broker.delayed_length("default") == 10000
        consumer = await _consumer(broker)
        try:
            assert await consumer.fetch(10, 0.2) == []
            cpu, wall = time.process_time(), time.monotonic()
            assert await consumer.fetch(10, 2.0) == []
            cpu, wall = time.process_time() - cpu, time.monotonic() - wall
            print(f"\nconsumer CPU while 10000 delayed messages wait: {cpu:.4f}s over {wall:.2f}s")
            assert cpu < 0.2
            assert await broker.delayed_length("default") == 10000
        finally:
            await consumer.close()


@BOTH
async def test_a_worker_runs_a_delayed_task_no_earlier_than_its_eta(make_app: AppFactory) -> None:
    app = make_app()
    ran_at: dict[str, float] = {}

    @app.task
    async def stamp(name: str) -> str:
        ran_at[name] = time.time()
        return name

    async with app, running_worker(app, concurrency=2) as worker:
        broker = await _broker(app)
        eta = time.time() + 1.0
        await broker.publish("default", _body(app, stamp.name, "later", eta=eta), eta=eta)
        assert await (await stamp.send("now")).get(timeout=5) == "now"
        assert worker.parked == 0  # held by the broker, not by the worker
        await wait_until(lambda: _true("later" in ran_at), timeout=10)
        assert eta <= ran_at["later"] < eta + 1.0


@BOTH
async def test_lateness_of_a_thousand_delayed_tasks_run_by_a_worker(
    make_app: AppFactory, transport: str
) -> None:
    """The precision a user sees: eta to the task starting, through a whole worker."""
    app = make_app()
    lateness: list[float] = []
    done = asyncio.Event()

    @app.task
    async def stamp(eta: float) -> None:
        lateness.append(time.time() - eta)
        if len(lateness) == 1000:
            done.set()

    async with app, running_worker(app, concurrency=100):
        broker = await _broker(app)
        start = time.time() + 1.5
        etas = [start + i / 1000 for i in range(1000)]
        await broker.publish_many(
            [("default", _body(app, stamp.name, eta, eta=eta), eta) for eta in etas]
        )
        async with asyncio.timeout(30):
            await done.wait()
    late = sorted(lateness)
    p50, p99 = statistics.median(late), late[int(len(late) * 0.99) - 1]
    print(
        f"\n{transport} worker lateness over 1000 tasks due in 1 s: "
        f"p50={p50:.4f}s p99={p99:.4f}s max={late[-1]:.4f}s"
    )
    assert late[0] >= 0, "a task started before its eta"
    assert p99 < 1.5
