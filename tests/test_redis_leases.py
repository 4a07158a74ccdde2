"""Redis leases (issue 7): fencing, atomic store-and-ack, lost replies reconciled, waits
collected promptly, a blocked loop that keeps its lease, and a worker that waits for its broker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from conftest import PrivateRedis, free_port, port_open, running_worker, wait_until

from aioqueue import AioQueueError, App
from aioqueue.backends.redis import RedisBackend
from aioqueue.brokers.redis import RedisBroker

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def app(redis_url: str, key_prefix: str, redis_cleanup: None) -> App:
    return App(
        f"leases-{key_prefix}",  # its own client names: a test kills only its own connections
        broker=redis_url,
        key_prefix=key_prefix,
        worker_heartbeat_interval=0.1,
        worker_heartbeat_ttl=0.5,
    )


def _parts(app: App) -> tuple[RedisBroker, RedisBackend]:
    broker, backend = app.broker, app.backend
    assert isinstance(broker, RedisBroker) and isinstance(backend, RedisBackend)
    return broker, backend


async def test_a_worker_that_lost_its_lease_can_neither_ack_nor_store(
    app: App, raw: aioredis.Redis, key_prefix: str
) -> None:
    """Fencing: once the message left this worker's processing list (swept to another worker),
    the late worker's store-and-ack changes nothing, and the newer attempt's result stands."""

    @app.task
    async def job() -> int:
        return 1

    async with app:
        broker, backend = _parts(app)
        result = await job.send()
        late = broker.consumer(["default"], worker_id="late")
        await late.start()
        try:
            (delivery,) = await late.fetch(1, 0)
            # the sweep hands it to another worker, which stores its own outcome
            processing = f"{key_prefix}:{{default}}:processing:late"
            assert await raw.lrem(processing, -1, delivery.body) == 1
            reply_to = backend.reply_to()
            newer = app.codec.encode_outcome(_success(result.id, "newer"))
            await backend.store(result.id, newer, ttl=60, reply_to=reply_to)
            stale = app.codec.encode_outcome(_success(result.id, "stale"))
            held = await backend.store_and_ack(
                delivery, result.id, stale, ttl=60, reply_to=reply_to
            )
            assert held is False
            assert await result.get(timeout=5) == "newer"
            # the plain give-back and dead-letter paths are fenced too
            await raw.rpush(f"{key_prefix}:{{default}}", b"unrelated")
            await delivery.requeue(count_attempt=True)
            await delivery.dead_letter("late")
            assert await raw.lrange(f"{key_prefix}:{{default}}", 0, -1) == [b"unrelated"]
            assert await broker.dead_letters("default") == []
        finally:
            await late.close()


async def test_a_worker_whose_lease_lapsed_stores_nothing_for_a_swept_message(
    app: App, raw: aioredis.Redis, key_prefix: str
) -> None:
    """Fencing when the worker wakes before the newer attempt finished: once its lease may have
    lapsed (here: no renewal for longer than half the TTL, as after a SIGSTOP), its settle is
    the fenced script, which writes no result for a message no longer in its list."""

    @app.task
    async def job() -> int:
        return 1

    async with app:
        broker, backend = _parts(app)
        result = await job.send()
        late = broker.consumer(["default"], worker_id="frozen")
        await late.start()
        try:
            (delivery,) = await late.fetch(1, 0)
            assert not delivery.lease_in_doubt
            late._lease.renewed_at -= 60  # type: ignore[attr-defined]  # as if frozen a minute
            assert delivery.lease_in_doubt
            processing = f"{key_prefix}:{{default}}:processing:frozen"
            assert await raw.lrem(processing, -1, delivery.body) == 1  # swept meanwhile
            stale = app.codec.encode_outcome(_success(result.id, "stale"))
            assert not await backend.store_and_ack(
                delivery, result.id, stale, ttl=60, reply_to=backend.reply_to()
            )
            assert await raw.exists(f"{key_prefix}:result:{result.id}") == 0
        finally:
            await late.close()


async def test_the_first_final_outcome_wins(app: App) -> None:
    async with app:
        _, backend = _parts(app)
        first = app.codec.encode_outcome(_success("t1", "first"))
        second = app.codec.encode_outcome(_success("t1", "second"))
        await backend.store("t1", first, ttl=60, reply_to=None)
        await backend.store("t1", second, ttl=60, reply_to=None)
        assert await app.AsyncResult("t1").get(timeout=5) == "first"


async def test_a_refused_result_write_leaves_the_message_unacked(
    app: App, raw: aioredis.Redis, key_prefix: str
) -> None:
    """Item 13: store and ack are one script: a write Redis refuses removes nothing."""

    @app.task
    async def job() -> int:
        return 1

    async with app:
        broker, backend = _parts(app)
        result = await job.send()
        consumer = broker.consumer(["default"], worker_id="refused")
        await consumer.start()
        try:
            (delivery,) = await consumer.fetch(1, 0)
            outcome = app.codec.encode_outcome(_success(result.id, 1))
            with pytest.raises(AioQueueError, match="out of range"):
                # a PX value Redis rejects ("value is not an integer or out of range")
                await backend.store_and_ack(delivery, result.id, outcome, ttl=1e300, reply_to=None)
            processing = f"{key_prefix}:{{default}}:processing:refused"
            assert await raw.lrange(processing, 0, -1) == [delivery.body]
            assert await raw.exists(f"{key_prefix}:result:{result.id}") == 0
            assert await backend.store_and_ack(
                delivery, result.id, outcome, ttl=60, reply_to=backend.reply_to()
            )
            assert await raw.llen(processing) == 0
            assert await result.get(timeout=5) == 1
        finally:
            await consumer.close()


async def test_a_message_taken_by_a_background_wait_is_handed_out_first(app: App) -> None:
    """Item 7: what a BLMOVE took meanwhile comes before more fetching from other queues."""

    @app.task(queue="a")
    async def on_a(n: int) -> int:
        return n

    @app.task(queue="b")
    async def on_b(n: int) -> int:
        return n

    async with app:
        broker, _ = _parts(app)
        consumer = broker.consumer(["a", "b"], worker_id="collector")
        await consumer.start()
        try:
            assert await consumer.fetch(1, 0.2) == []  # both BLMOVEs now wait in the background
            await on_b.send(99)

            async def moved() -> bool:
                return await broker.queue_length("b") == 0

            await wait_until(moved)
            await asyncio.sleep(0.05)  # let the BLMOVE reply be read
            await on_a.send_many([(i,) for i in range(5)])
            got = await consumer.fetch(3, 0)
            assert "b" in [d.queue for d in got]
            for delivery in got:
                await delivery.ack()
        finally:
            await consumer.close()


async def test_a_lost_wait_reply_is_reconciled_from_the_processing_list(
    app: App, raw: aioredis.Redis, key_prefix: str
) -> None:
    """Item 15: the server moved a message but the worker never got the reply (its connection
    died): the next fetch finds it in the worker's own processing list and hands it out."""

    @app.task
    async def job(n: int) -> int:
        return n

    async with app:
        broker, _ = _parts(app)
        consumer = broker.consumer(["default"], worker_id="lossy")
        await consumer.start()
        try:
            assert await consumer.fetch(1, 0.2) == []  # a BLMOVE now waits
            # as if the server moved a message and the reply was lost with the connection
            _, body = _encoded(app, job.name, 7)
            processing = f"{key_prefix}:{{default}}:processing:lossy"
            clients = await raw.client_list()
            mine = f"aioqueue:{app.name}:blocking"
            blocking = [c for c in clients if c.get("name", "") == mine]
            assert blocking, f"no connection named {mine}"
            await raw.lpush(processing, body)
            for client in blocking:
                await raw.client_kill_filter(_id=client["id"])
            got: list[Any] = []
            deadline = time.monotonic() + 10
            while not got and time.monotonic() < deadline:
                try:
                    got = await consumer.fetch(1, 0.2)
                except Exception:
                    continue  # the killed wait surfaces once as a broker error
            assert len(got) == 1
            assert app.codec.decode(got[0].body).args == (7,)
            await got[0].ack()
            assert await raw.llen(processing) == 0
        finally:
            await consumer.close()


async def test_an_async_task_blocking_the_loop_keeps_its_lease_and_is_named(
    redis_url: str, key_prefix: str, redis_cleanup: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 12: the lease is renewed from a thread, so a task that blocks the event loop for
    twice the TTL is not swept and run again elsewhere; the watchdog names it."""
    app = App(
        "blocker",
        broker=redis_url,
        key_prefix=key_prefix,
        worker_heartbeat_interval=0.2,
        worker_heartbeat_ttl=1.0,
    )
    runs: list[int] = []

    @app.task
    async def hog() -> str:
        runs.append(1)
        time.sleep(2.0)  # noqa: ASYNC251 - the point of the test
        return "done"

    caplog.set_level(logging.WARNING, "aioqueue.worker")
    async with app, running_worker(app, concurrency=2):
        # a second consumer sweeps, as another worker would
        other = app.broker.consumer(["default"], worker_id="sweeper")
        await other.start()
        try:
            result = await hog.send()
            assert await result.get(timeout=10) == "done"
            await asyncio.sleep(0.5)  # sweeps by the other consumer get their chance
            assert await other.fetch(10, 0) == []
        finally:
            await other.close()
    assert runs == [1]
    blocked = [
        r.getMessage() for r in caplog.records if "event loop has been blocked" in r.getMessage()
    ]
    assert blocked and "hog" in blocked[0]


async def test_a_worker_started_before_its_broker_waits_for_it(tmp_path: Path) -> None:
    """Item 18: under compose/Kubernetes start order, the worker retries instead of exiting."""
    port = free_port()
    server = PrivateRedis(port, tmp_path)
    app = App("early", broker=f"redis://127.0.0.1:{port}/0", broker_connect_timeout=0.5)

    @app.task
    async def ping() -> str:
        return "pong"

    worker = app.worker(concurrency=2)
    running = asyncio.get_running_loop().create_task(worker.run())
    try:
        await asyncio.sleep(1.0)
        assert not running.done() and not worker.ready.is_set()
        server.start()
        await wait_until(lambda: port_open(port))
        await asyncio.wait_for(worker.ready.wait(), 15)
        assert await (await ping.send()).get(timeout=5) == "pong"
    finally:
        worker.stop()
        await asyncio.wait_for(running, 15)
        await app.close()
        server.kill()


def _success(task_id: str, value: Any) -> Any:
    from aioqueue import Outcome, States

    return Outcome(task_id, States.SUCCESS, value, date_done=time.time())


def _encoded(app: App, task: str, *args: Any) -> tuple[str, bytes]:
    from aioqueue import Message

    message = Message(id=f"lost-{time.time_ns()}", task=task, queue="default", args=args)
    return message.id, app.codec.encode(message)
