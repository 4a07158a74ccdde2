"""AMQP-specific behaviour against the real RabbitMQ: confirms, reconnects, crashes, quorum limits.

Every app here uses a key prefix of its own (queues ``<prefix>.<queue>``) and deletes the queues
it declared when it closes. ``rabbitmqctl`` (run as root here) closes the test's own named
connections and sets policies only in a virtual host of the test's own, deleted after it;
nothing else on the server is touched.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiormq
import pytest
from amqp_cli_app import make_app
from conftest import (
    AMQP_URL,
    REDIS_URL,
    fetch_exactly,
    require_server,
    running_worker,
    wait_until,
)

from aioqueue import App, BrokerError, ResultBackendError
from aioqueue._amqp import guarded
from aioqueue.brokers.amqp import AmqpBroker
from aioqueue.brokers.base import Delivery

pytestmark = pytest.mark.timeout(30)

TESTS_DIR = Path(__file__).parent
AppMaker = Callable[..., App]


@pytest.fixture
async def amqp_app(key_prefix: str) -> AsyncIterator[AppMaker]:
    """Apps on RabbitMQ (rpc:// results unless told otherwise), closed and cleaned up after."""
    require_server(AMQP_URL, "RabbitMQ")
    apps: list[App] = []

    def factory(**config: Any) -> App:
        config.setdefault("broker", AMQP_URL)
        config.setdefault("backend", "rpc://")
        config.setdefault("key_prefix", key_prefix)
        config.setdefault("amqp_delete_queues_on_close", True)
        app = make_app(**config)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        await app.close()


async def rabbitmqctl(*args: str) -> str:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not available")
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        pytest.skip(f"rabbitmqctl {args[0]} failed: {err.decode().strip()}")
    return out.decode()


async def close_connections(name_part: str) -> int:
    """Close, from the server side, every connection whose connection_name contains name_part."""
    listing = await rabbitmqctl(
        "list_connections", "--no-table-headers", "pid", "client_properties"
    )
    pids = [line.split("\t", 1)[0] for line in listing.splitlines() if name_part in line]
    for pid in pids:
        await rabbitmqctl("close_connection", pid, "closed by aioqueue test")
    return len(pids)


async def close_own_connections() -> int:
    """Close, all at once, every connection of this process's apps (``rabbitmqctl
    close_all_connections`` as this process sees it, without touching anybody else's)."""
    listing = await rabbitmqctl(
        "list_connections", "--no-table-headers", "pid", "client_properties"
    )
    mine = f'@{socket.gethostname()}:{os.getpid()}"'
    pids = [
        line.split("\t", 1)[0]
        for line in listing.splitlines()
        if '"aioqueue:amqp-cli/' in line and mine in line
    ]
    await asyncio.gather(
        *(rabbitmqctl("close_connection", pid, "closed by aioqueue test") for pid in pids)
    )
    return len(pids)


def channel_count(broker: AmqpBroker) -> int:
    connection = broker.connection
    assert connection is not None and connection.transport is not None
    return len(connection.transport.connection.channels)


# -- sending ------------------------------------------------------------------------------


async def test_thousand_concurrent_sends_share_a_small_channel_pool(amqp_app: AppMaker) -> None:
    app = amqp_app(amqp_channel_pool_size=3)
    crash = app.tasks["amqp_cli_app.crash"]
    async with app:
        await asyncio.gather(*(crash.send() for _ in range(1000)))
        broker = app.broker
        assert isinstance(broker, AmqpBroker)
        # three publishing channels and one for declarations, not one per send
        assert channel_count(broker) <= 4
        # every send returned after its confirm: all of them are in the queue
        assert await broker.queue_length("default") == 1000


@pytest.fixture
async def own_vhost(key_prefix: str) -> AsyncIterator[tuple[str, str]]:
    """A RabbitMQ virtual host of this test's own, for policies: (its name, a URL into it).

    Requested before the app fixture, so it is deleted after every app on it has closed.
    """
    require_server(AMQP_URL, "RabbitMQ")
    vhost = key_prefix
    await rabbitmqctl("add_vhost", vhost)
    try:
        await rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield vhost, AMQP_URL.rstrip("/") + "/" + vhost
    finally:
        await rabbitmqctl("delete_vhost", vhost)


async def test_nack_raises_broker_error(
    own_vhost: tuple[str, str], amqp_app: AppMaker, key_prefix: str
) -> None:
    vhost, url = own_vhost
    app = amqp_app(broker=url)
    crash = app.tasks["amqp_cli_app.crash"]
    async with app:
        await crash.send()  # declares the queue
        # Policies go on the test's own vhost, never on the shared default one.
        await rabbitmqctl(
            *("set_policy", "-p", vhost, "--apply-to", "queues", f"{key_prefix}-full"),
            f"^{key_prefix}\\.default$",
            '{"max-length":1,"overflow":"reject-publish"}',
        )
        with pytest.raises(BrokerError, match="nack") as caught:
            for _ in range(50):  # the policy takes effect within moments
                await crash.send()
        assert "guest:guest" not in str(caught.value)


async def test_publisher_confirms_off_really_sends_unconfirmed(
    own_vhost: tuple[str, str], amqp_app: AppMaker, key_prefix: str
) -> None:
    """amqp_publisher_confirms=False: no confirm is asked for, so a publish RabbitMQ refuses
    is lost without an error (at-most-once, as documented), where a confirmed one raises."""
    vhost, url = own_vhost
    confirmed = amqp_app(broker=url)
    unconfirmed = amqp_app(broker=url, amqp_publisher_confirms=False)
    async with confirmed, unconfirmed:
        await confirmed.tasks["amqp_cli_app.crash"].send()  # declares the queue
        await rabbitmqctl(
            *("set_policy", "-p", vhost, "--apply-to", "queues", f"{key_prefix}-full"),
            f"^{key_prefix}\\.default$",
            '{"max-length":1,"overflow":"reject-publish"}',
        )
        with pytest.raises(BrokerError, match="nack"):
            for _ in range(50):  # the policy takes effect within moments
                await confirmed.tasks["amqp_cli_app.crash"].send()
        for _ in range(20):
            await unconfirmed.tasks["amqp_cli_app.crash"].send()
        broker = unconfirmed.broker
        assert isinstance(broker, AmqpBroker)
        assert await broker.queue_length("default") == 1


async def test_lost_connection_fails_sends_loudly_and_sending_recovers(
    amqp_app: AppMaker, key_prefix: str
) -> None:
    """RabbitMQ drops the client's connection under a stream of sends: none is lost silently."""
    app = amqp_app(amqp_reconnect_interval=0.1)
    crash = app.tasks["amqp_cli_app.crash"]
    confirmed = 0
    errors: list[BaseException] = []
    after_close = asyncio.Event()
    recovered = asyncio.Event()

    async def keep_sending() -> None:
        nonlocal confirmed
        while not recovered.is_set():
            try:
                await crash.send()
            except Exception as exc:
                errors.append(exc)
                continue
            confirmed += 1
            if after_close.is_set() and confirmed > 0:
                recovered.set()

    async with app:
        await crash.send()
        confirmed += 1
        senders = [asyncio.create_task(keep_sending()) for _ in range(20)]
        assert (
            await close_connections(
                f"aioqueue:amqp-cli/client@{socket.gethostname()}:{os.getpid()}"
            )
            >= 1
        )
        after_close.set()
        await asyncio.wait_for(recovered.wait(), 20)
        await asyncio.gather(*senders)
        assert all(isinstance(e, BrokerError) for e in errors), errors[:3]
        assert all("guest:guest" not in str(e) for e in errors)
        # everything a send() returned for is in the queue (a failed one may be there too)
        assert await app.broker.queue_length("default") >= confirmed


class _DyingChannel:
    """Just what guarded() looks at: an aiormq channel's is_closed and closing observer."""

    def __init__(self) -> None:
        self._closing: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def is_closed(self) -> bool:
        return self._closing.done()

    @property
    def closing(self) -> asyncio.Future[None]:
        return self._closing

    def die(self) -> None:
        self._closing.set_exception(aiormq.exceptions.ConnectionClosed(320, "forced"))


async def test_an_operation_stuck_on_a_dead_connection_fails_when_its_channel_closes() -> None:
    """The hang behind the stalled worker: aiormq queues frames in a bounded queue that nobody
    reads once the connection died, so an ack or publish waiting for room there waits forever
    unless something stops it when the channel closes."""
    channel: Any = _DyingChannel()
    frames: asyncio.Queue[int] = asyncio.Queue(maxsize=1)
    frames.put_nowait(0)  # full, and the writer that would empty it is gone

    async def ack() -> None:
        with guarded(channel):
            await frames.put(1)

    stuck = asyncio.gather(*(ack() for _ in range(3)), return_exceptions=True)
    await asyncio.sleep(0.01)
    channel.die()
    outcomes = await asyncio.wait_for(stuck, 1)
    assert all(isinstance(o, aiormq.exceptions.ChannelInvalidStateError) for o in outcomes)
    with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
        await ack()  # closed already: refused at once

    # a cancellation from elsewhere stays a cancellation
    other: Any = _DyingChannel()

    async def wait_on_other() -> None:
        with guarded(other):
            await frames.put(2)

    task = asyncio.create_task(wait_on_other())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# -- consuming ----------------------------------------------------------------------------


async def test_worker_resumes_after_the_broker_closes_its_connection(amqp_app: AppMaker) -> None:
    """2,000 tasks; RabbitMQ closes the worker's connection mid-stream; every one completes."""
    app = amqp_app(amqp_reconnect_interval=0.1)
    started = 0
    runs: Counter[int] = Counter()
    resume = asyncio.Event()

    @app.task
    async def step(i: int) -> int:
        nonlocal started
        started += 1
        if started > 300:
            await resume.wait()  # the connection is closed while these are held
        runs[i] += 1
        return i

    async with app, running_worker(app, concurrency=20, worker_id="stream-worker") as worker:
        results = await step.send_many([(i,) for i in range(2000)])

        async def reached() -> bool:
            return started > 300

        await wait_until(reached)
        assert worker.id == "stream-worker"
        assert await close_connections("worker:stream-worker@") == 1
        resume.set()
        values = await asyncio.gather(*(r.get(timeout=25) for r in results))
    assert values == list(range(2000))
    assert set(runs) == set(range(2000))
    # The held ones were unacked, so RabbitMQ gave them again; a copy that arrives after its
    # first run stored the result is acked without running, so at most the 20 held run twice.
    assert 2000 <= sum(runs.values()) <= 2000 + 20


async def test_every_task_completes_when_the_broker_closes_all_connections_at_once(
    amqp_app: AppMaker, redis_cleanup: None
) -> None:
    """Sender, worker consumer and worker client connections all dropped mid-stream.

    Nothing may wait forever on a dead connection: not an ack (the worker would stall with
    its slots full), not a publish (a send_many would never return), not the shutdown.
    """
    sender = amqp_app(backend=REDIS_URL, amqp_reconnect_interval=0.1)
    worker_app = amqp_app(backend=REDIS_URL, amqp_reconnect_interval=0.1)
    step: Any = None
    for app in (sender, worker_app):

        @app.task(name="amqp_cli_app.double")
        async def double(i: int) -> int:
            await asyncio.sleep(0.04)  # 20 slots: ~500 tasks (and acks) a second
            return 2 * i

        if app is sender:
            step = double
    total, chunk_size = 2000, 100
    results: list[Any] = []

    async def send_all() -> None:
        for start in range(0, total, chunk_size):
            chunk = [step.s(i).set(task_id=f"t-{i}") for i in range(start, start + chunk_size)]
            for attempt in range(10):
                try:
                    async with asyncio.timeout(10):  # a hang here is the bug
                        results.extend(await step.send_many(chunk))
                    break
                except BrokerError:
                    await asyncio.sleep(0.1 * (attempt + 1))
            else:
                raise AssertionError("the chunk was never sent")
            await asyncio.sleep(0.2)  # ~500 a second too: ~4 s of sending, acking and storing

    async with sender:
        worker_cm = running_worker(worker_app, concurrency=20, worker_id="close-all")
        worker = await worker_cm.__aenter__()
        try:
            sending = asyncio.create_task(send_all())

            async def streaming() -> bool:
                return worker.processed >= 100

            await wait_until(streaming)
            assert await close_own_connections() >= 3  # sender, worker client, consumer
            await asyncio.wait_for(sending, 20)
            values = await asyncio.gather(*(r.get(timeout=20) for r in results))
        finally:
            loop = asyncio.get_running_loop()
            stopping = loop.time()
            await asyncio.wait_for(worker_cm.__aexit__(None, None, None), 10)
            stopped_in = loop.time() - stopping
    # sends after the close went through the reconnected channel pool (a send caught by the
    # close itself, if any, raised BrokerError and was sent again)
    assert len(results) == total
    assert values == [2 * i for i in range(total)]
    assert stopped_in < 5, f"the graceful stop took {stopped_in:.1f}s"


async def test_prefetch_follows_free_slots(amqp_app: AppMaker) -> None:
    app = amqp_app()
    crash = app.tasks["amqp_cli_app.crash"]
    async with app:
        await crash.send_many([() for _ in range(20)])
        broker = app.broker
        consumer = broker.consumer(["default"], worker_id="prefetch-test")
        await consumer.start()
        try:
            first = await fetch_exactly(consumer, 3)

            async def seventeen_left() -> bool:
                return await broker.queue_length("default") == 17

            await wait_until(seventeen_left)
            # three held, two more free slots: the limit grows to five, no further
            await fetch_exactly(consumer, 2)

            async def fifteen_left() -> bool:
                return await broker.queue_length("default") == 15

            await wait_until(fifteen_left)
            # three slots free again after three acks: three more, and the limit stays at five
            for delivery in first:
                await delivery.ack()

            async def twelve_left() -> bool:
                return await broker.queue_length("default") == 12

            await wait_until(twelve_left)
            await fetch_exactly(consumer, 3)
        finally:
            await consumer.close()
        # closing gave back the five unsettled ones
        assert await broker.queue_length("default") == 17


async def test_prefetch_bound_spans_several_classic_queues(amqp_app: AppMaker) -> None:
    app = amqp_app()
    crash = app.tasks["amqp_cli_app.crash"]
    async with app:
        for queue in ("a", "b"):
            await crash.options(queue=queue).send_many([() for _ in range(5)])
        broker = app.broker
        consumer = broker.consumer(["a", "b"], worker_id="two-queues")
        await consumer.start()
        try:
            await fetch_exactly(consumer, 3)  # a worker with three free slots

            async def seven_left() -> bool:
                return await broker.queue_length("a") + await broker.queue_length("b") == 7

            # a channel-wide limit of three across both queues (per-queue limits would let
            # six out); RabbitMQ counts a message out of the queue when it sends it
            await wait_until(seven_left)
            assert await seven_left()
        finally:
            await consumer.close()


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_attempt_counts_redeliveries(amqp_app: AppMaker, queue_type: str) -> None:
    app = amqp_app(amqp_queue_type=queue_type)
    crash = app.tasks["amqp_cli_app.crash"]
    async with app:
        await crash.send()
        broker = app.broker
        consumer = broker.consumer(["default"], worker_id=f"attempts-{queue_type}")
        await consumer.start()
        try:
            seen: list[Delivery] = []
            for expected in (1, 2, 3):
                (delivery,) = await consumer.fetch(1, 5)
                # quorum queues count deliveries (x-delivery-count); on classic ones a
                # redelivered message is published again with its attempt in a header
                assert delivery.attempt == expected
                assert delivery.redelivered == (expected > 1)
                seen.append(delivery)
                if expected < 3:
                    await delivery.requeue(count_attempt=True)
            await seen[-1].ack()
        finally:
            await consumer.close()


# -- dead letters -------------------------------------------------------------------------


async def test_dead_letters_are_read_without_being_consumed(amqp_app: AppMaker) -> None:
    app = amqp_app()
    async with app:
        broker = app.broker
        assert isinstance(broker, AmqpBroker)
        for i in range(3):
            await broker.bury("default", f"body-{i}".encode(), f"reason {i}")
        first = await broker.dead_letters("default")
        again = await broker.dead_letters("default", limit=2)
        assert [d.body for d in first] == [b"body-0", b"body-1", b"body-2"]
        assert [d.reason for d in first] == ["reason 0", "reason 1", "reason 2"]
        assert [d.body for d in again] == [b"body-0", b"body-1"]
        assert all(d.queue == "default" for d in first)
        assert await broker.dead_letters("never-used") == []


# -- rpc:// -------------------------------------------------------------------------------


async def test_rpc_refuses_to_wait_for_a_task_it_was_not_sent(amqp_app: AppMaker) -> None:
    sender = amqp_app()
    crash = sender.tasks["amqp_cli_app.crash"]
    # no `async with`: the app connects lazily on send and is not listening for results
    result = await crash.send()
    assert sender.backend.reply_to() is None
    with pytest.raises(ResultBackendError, match="only to the process that sent it"):
        await result.get(timeout=5)
    other = amqp_app()
    async with other:
        with pytest.raises(ResultBackendError, match="rpc://"):
            await other.AsyncResult(result.id).get(timeout=5)
        assert await other.AsyncResult(result.id).state() == "PENDING"


# -- real worker processes ----------------------------------------------------------------


def worker_env(key_prefix: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        AIOQUEUE_BROKER_URL=AMQP_URL,
        AIOQUEUE_RESULT_BACKEND="rpc://",
        AIOQUEUE_KEY_PREFIX=key_prefix,
        PYTHONPATH=os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")]),
        **extra,
    )
    return env


async def start_worker(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aioqueue.cli",
        "worker",
        "amqp_cli_app:app",
        "--concurrency",
        "1",
        "--processes",
        "1",
        "--loglevel",
        "warning",
        env=env,
        cwd=TESTS_DIR,
        stdout=asyncio.subprocess.DEVNULL,
    )


@pytest.mark.slow
async def test_sigkill_mid_task_is_redelivered_to_another_worker(
    amqp_app: AppMaker, key_prefix: str, tmp_path: Path
) -> None:
    app = amqp_app()
    hang_once = app.tasks["amqp_cli_app.hang_once"]
    marker = tmp_path / "runs"
    async with app:
        result = await hang_once.send(str(marker))
        proc = await start_worker(worker_env(key_prefix))
        try:

            async def started() -> bool:
                return marker.exists()

            await wait_until(started, timeout=15)
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        async with running_worker(app):
            assert await result.get(timeout=15) == "ran 2 times"


@pytest.mark.slow
async def test_poison_message_on_a_quorum_queue_ends_in_the_dead_letters(
    amqp_app: AppMaker, key_prefix: str
) -> None:
    app = amqp_app(amqp_queue_type="quorum", amqp_delivery_limit=1)
    crash = app.tasks["amqp_cli_app.crash"]
    env = worker_env(
        key_prefix, AIOQUEUE_AMQP_QUEUE_TYPE="quorum", AIOQUEUE_AMQP_DELIVERY_LIMIT="1"
    )
    async with app:
        await crash.send()
        broker = app.broker

        async def dead_or_back() -> bool:
            return bool(await broker.dead_letters("default")) or (
                await broker.queue_length("default") == 1
            )

        deaths = 0
        while not await broker.dead_letters("default"):
            assert deaths < 3, "the delivery limit did not stop the poison message"
            proc = await start_worker(env)
            assert await asyncio.wait_for(proc.wait(), 15) == -signal.SIGKILL
            deaths += 1
            await wait_until(dead_or_back)
        assert deaths == 2  # delivered, returned once (limit 1), delivered again, then dead
        (dead,) = await broker.dead_letters("default")
        assert b"amqp_cli_app.crash" in dead.body
        assert dead.reason == "rabbitmq: delivery_limit"
        assert await broker.queue_length("default") == 0


async def test_rpc_pushes_states_and_keeps_outcomes_for_their_ttl(amqp_app: AppMaker) -> None:
    app = amqp_app()
    async with app:
        backend = app.backend
        reply_to, token = backend.reply_to(), backend.send_token()
        assert reply_to is not None and token is not None
        await backend.store_state("t1", b"started", ttl=60, reply_to=reply_to)  # type: ignore[call-arg]

        async def state_arrived() -> bool:
            return await backend.get("t1") == b"started"

        await wait_until(state_arrived)
        await backend.store("t1", b"done", ttl=0.3, reply_to=reply_to)
        assert await backend.wait("t1", timeout=5, token=token) == b"done"
        assert await backend.get("t1") == b"done"

        async def expired() -> bool:
            return await backend.get("t1") is None

        await wait_until(expired, timeout=5)
