"""Operating queues (brokers' QueueAdmin, ``aioqueue.operations``) on every transport."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import AppFactory, running_worker, wait_until

from aioqueue import App, TaskNotRegistered
from aioqueue.brokers.amqp import AmqpBroker
from aioqueue.brokers.amqp_probe import CHANNEL_MAX
from aioqueue.brokers.base import QueueAdmin, QueueStats, dead_letter_id, first_attempt
from aioqueue.brokers.redis import RedisBroker
from aioqueue.context import current_context
from aioqueue.message import Message
from aioqueue.operations import (
    drop_dead,
    format_stats,
    list_dead,
    purge,
    queue_stats,
    requeue_dead,
)

pytestmark = pytest.mark.timeout(30)


def amqp(app: App) -> bool:
    return app.conf.broker_url.startswith("amqp")


async def stats_of(app: App, queue: str = "default") -> QueueStats:
    (stats,) = await queue_stats(app, [queue])
    return stats


def test_first_attempt_strips_only_the_broker_stamp() -> None:
    assert first_attempt(b'{"attempt":3,"v":1,"id":"x"}') == b'{"v":1,"id":"x"}'
    assert first_attempt(b'{"attempt":12,"priority":4,"v":1}') == b'{"priority":4,"v":1}'
    assert first_attempt(b'{"v":1,"id":"x"}') == b'{"v":1,"id":"x"}'
    assert dead_letter_id(b'{"attempt":3,"v":1,"id":"x"}') == "x"
    assert dead_letter_id(b"\xff not json") is None
    assert dead_letter_id(b'{"id": 7}') is None


async def test_stats_count_waiting_and_delayed_then_purge_empties_both(
    make_app: AppFactory,
) -> None:
    app = make_app()

    @app.task
    async def noop(n: int) -> int:
        return n

    async with app:
        assert isinstance(app.broker, QueueAdmin)
        empty = await stats_of(app)
        assert (empty.depth, empty.delayed, empty.consumers, empty.dead) == (0, 0, 0, 0)
        assert empty.oldest_age is None
        for n in range(3):
            await noop.send(n)
        await noop.options(countdown=600).send(9)

        async def counted() -> bool:  # RabbitMQ's counts lag a confirmed publish a little
            stats = await stats_of(app)
            return (stats.depth, stats.delayed) == (3, 1)

        await wait_until(counted, timeout=5)
        stats = await stats_of(app)
        assert stats.in_flight == 0 and "in_flight" not in stats.unknown  # no worker holds any
        if amqp(app):  # waiting messages cannot be seen there without taking them
            assert stats.oldest_age is None and "oldest_age" in stats.unknown
            assert stats.oldest is None
        else:
            assert stats.in_flight == 0
            assert stats.oldest_age is not None and 0 <= stats.oldest_age < 10
        assert await purge(app, "default") == 4

        async def emptied() -> bool:
            stats = await stats_of(app)
            return (stats.depth, stats.delayed) == (0, 0)

        await wait_until(emptied, timeout=5)


async def test_stats_see_consumers_and_messages_in_flight(make_app: AppFactory) -> None:
    app = make_app()
    gate = asyncio.Event()

    @app.task
    async def held() -> str:
        await gate.wait()
        return "done"

    async with app, running_worker(app):
        result = await held.send()

        async def running() -> bool:
            stats = await stats_of(app)
            return stats.consumers == 1 and stats.in_flight == 1

        await wait_until(running, timeout=10)
        assert (await stats_of(app)).depth == 0
        gate.set()
        assert await result.get(timeout=10) == "done"
        await wait_until(lambda: _in_flight_is(app, 0), timeout=5)


async def test_in_flight_and_oldest_held_are_what_the_workers_hold(make_app: AppFactory) -> None:
    """Three tasks blocked on an event in a worker with room for more: IN FLIGHT is three on
    every transport (on RabbitMQ from the worker's answer) and the oldest held message is at
    least as old as the time since the first was sent."""
    app = make_app()
    gate = asyncio.Event()
    started = 0

    @app.task
    async def blocked() -> None:
        nonlocal started
        started += 1
        await gate.wait()

    async with app, running_worker(app, concurrency=10):
        results = [await blocked.send()]
        first_sent = time.time()
        results += [await blocked.send() for _ in range(2)]

        async def all_started() -> bool:
            return started == 3

        await wait_until(all_started, timeout=10)
        asked = time.time()
        stats = await stats_of(app)
        assert (stats.depth, stats.in_flight, stats.consumers) == (0, 3, 1), stats
        assert stats.unknown == {}, stats
        assert stats.oldest_held_age is not None and stats.oldest_held_age >= asked - first_sent
        assert stats.oldest == stats.oldest_held_age
        (alone,) = await queue_stats(app, ["default"], ask_workers=False)
        if amqp(app):  # the broker alone cannot tell: unknown, never a guess
            assert alone.in_flight is None and "in_flight" in alone.unknown
        else:
            assert alone.in_flight == 3
        assert alone.oldest_held_age is None and "oldest_held_age" not in stats.unknown
        gate.set()
        for result in results:
            await result.get(timeout=10)
        await wait_until(lambda: _in_flight_is(app, 0), timeout=5)
        assert (await stats_of(app)).oldest is None


async def test_a_listener_that_does_not_answer_makes_the_worker_numbers_unknown(
    redis_url: str, key_prefix: str, redis_cleanup: None
) -> None:
    """A live listener that does not answer in time (here a bare subscriber of the control
    channel) may hold messages: the oldest held age is then unknown, not a partial answer."""
    app = App("ops", broker=redis_url, backend=redis_url, key_prefix=key_prefix)
    async with app:
        broker = app.broker
        assert isinstance(broker, RedisBroker)
        async with broker.client.pubsub() as silent:
            await silent.subscribe(f"{key_prefix}:control")
            (stats,) = await queue_stats(app, ["default"], timeout=0.3)
        assert stats.oldest_held_age is None
        assert "0 worker(s) answered within 0.3s" in stats.unknown["oldest_held_age"]
        assert stats.in_flight == 0  # Redis counts it itself
        assert "? default OLDEST: 0 worker(s) answered" in format_stats([stats])
        (stats,) = await queue_stats(app, ["default"], timeout=0.3)
        assert stats.unknown == {}


async def test_a_worker_answering_with_an_error_makes_the_worker_numbers_unknown() -> None:
    """A listener whose answer is an error (a worker that could not tell) leaves the held
    messages unknown; a queue named "error" is a queue, not an error."""
    app = App("ops", broker="memory://")
    bus = app.control.bus()
    replies: set[asyncio.Task[None]] = set()

    def failing(command: dict[str, object]) -> None:
        payload = {"worker": "w1", "error": "RuntimeError: boom"}
        task = asyncio.get_running_loop().create_task(bus.reply(str(command["reply_to"]), payload))
        replies.add(task)
        task.add_done_callback(replies.discard)

    async with app:
        listening = await bus.listen(lambda *_: None, on_request=failing)
        try:
            (stats,) = await queue_stats(app, ["error"], timeout=5)
        finally:
            await listening.aclose()
        assert stats.in_flight == 0 and stats.oldest_held_age is None
        assert stats.unknown == {"oldest_held_age": "worker(s) w1 could not answer"}
        gate = asyncio.Event()

        @app.task(queue="error")
        async def stuck() -> None:
            await gate.wait()

        async with running_worker(app, queues=["error"]):
            result = await stuck.send()

            async def held() -> bool:
                return (await stats_of(app, "error")).in_flight == 1

            await wait_until(held, timeout=5)
            (stats,) = await queue_stats(app, ["error"], timeout=5)
            assert stats.unknown == {} and stats.oldest_held_age is not None
            gate.set()
            await result.get(timeout=5)


async def _in_flight_is(app: App, count: int) -> bool:
    return (await stats_of(app)).in_flight == count


async def test_requeued_dead_letter_runs_again_under_its_id_as_a_first_attempt(
    make_app: AppFactory,
) -> None:
    app = make_app()
    async with app:
        async with running_worker(app):
            first = await app.send_task("ops.late", [5])
            second = await app.send_task("ops.late", [6])
            for result in (first, second):
                with pytest.raises(TaskNotRegistered):
                    await result.get(timeout=10)
            await wait_until(lambda: _dead_count_is(app, 2), timeout=10)
        listed = await list_dead(app, "default")
        assert {dead_letter_id(d.body) for d in listed} == {first.id, second.id}
        assert [
            dead_letter_id(d.body) for d in await list_dead(app, "default", frozenset({first.id}))
        ] == [first.id]

        @app.task(name="ops.late")
        async def late(n: int) -> tuple[int, int]:
            ctx = current_context()
            assert ctx is not None
            return n * 10, ctx.attempt

        assert await requeue_dead(app, "default", frozenset({first.id, "no-such-id"})) == 1
        assert await _dead_count_is(app, 1)
        async with running_worker(app):
            assert await first.get(timeout=10) == (50, 1)  # rebuilt from the annotation
        # the other one stays dead until dropped; dropping it again finds nothing
        assert await drop_dead(app, "default", None) == 1
        assert await _dead_count_is(app, 0)
        assert await drop_dead(app, "default", frozenset({second.id})) == 0
        assert await requeue_dead(app, "default", None) == 0


async def _dead_count_is(app: App, count: int) -> bool:
    return (await stats_of(app)).dead == count


async def test_redis_requeue_drops_the_attempt_the_broker_stamped(
    redis_url: str, key_prefix: str, redis_cleanup: None
) -> None:
    """A message that crashed its workers is dead-lettered with ``{"attempt":N,`` in front: the
    requeued copy must start again from attempt 1 (else max_attempts refuses it at once)."""
    app = App("ops", broker=redis_url, backend=redis_url, key_prefix=key_prefix)

    @app.task(name="ops.attempt")
    async def attempt() -> int:
        ctx = current_context()
        assert ctx is not None
        return ctx.attempt

    async with app:
        broker = app.broker
        assert isinstance(broker, RedisBroker)
        body = app.codec.encode(Message(id="stamped", task="ops.attempt", queue="default"))
        stamped = b'{"attempt":4,' + body[1:]
        record = broker.dead_record("default", stamped, "max attempts", max_size=None)
        await broker.client.lpush(broker.keys("default").dead, record)
        assert await requeue_dead(app, "default", frozenset({"stamped"})) == 1
        async with running_worker(app):
            assert await app.AsyncResult("stamped").get(timeout=10) == 1


async def test_amqp_counts_many_queues_at_once_past_a_connections_channel_numbers(
    amqp_url: str, key_prefix: str
) -> None:
    """Every passive declare of every queue at once: right counts for each queue (the missing
    delay buckets cost their channels, not the others'), and more declares than one
    connection has channel numbers (each used once) go on, on a new probe connection."""
    app = App(
        "ops",
        broker=amqp_url,
        backend="rpc://",
        key_prefix=key_prefix,
        amqp_delete_queues_on_close=True,
    )
    async with app:
        broker = await app.ready_broker()
        assert isinstance(broker, AmqpBroker)
        names = [f"many{n}" for n in range(5)]
        for n, name in enumerate(names):
            for _ in range(n):
                await broker.publish(name, b'{"v":1,"id":"w","task":"t"}')
            await broker.publish(name, b'{"v":1,"id":"d","task":"t"}', eta=time.time() + 600)

        async def counted() -> bool:
            rows = await queue_stats(app, names, ask_workers=False)
            return [(row.depth, row.delayed) for row in rows] == [(n, 1) for n in range(5)]

        await wait_until(counted, timeout=5)
        missing = [f"{key_prefix}.nothing.{n}" for n in range(CHANNEL_MAX // 2 + 10)]
        present = broker.names("many3").queue
        # two callers at once, 2 x 1,034 declares: more than a connection's 2,047 channels, so
        # one replaces the connection while the other still probes on it
        for probes in await asyncio.gather(
            broker.probe_many([present, *missing]), broker.probe_many([*missing, present])
        ):
            assert probes[present] == (3, 0)
            assert all(probes[name] is None for name in missing)
        rows = await queue_stats(app, names, ask_workers=False)
        assert [row.depth for row in rows] == list(range(5))
