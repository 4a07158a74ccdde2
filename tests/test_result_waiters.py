"""Waiting for results: many waiters, shared ids, handles across reconnects, the push cache.

Real-server tests use the shared Redis (db 15, a key prefix of their own) and RabbitMQ; the
outage test runs a private redis-server it starts and kills by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import hiredis
import pytest
import redis.asyncio as aioredis
from conftest import (
    AMQP_URL,
    AppFactory,
    PrivateRedis,
    port_open,
    require_server,
    running_worker,
    wait_until,
)
from redis import exceptions as redis_errors

from aioqueue import App, AsyncResult, ResultBackendError, ResultTimeout, TaskNotRegistered
from aioqueue._redis import Commands
from aioqueue.backends._listener import parse_reply
from aioqueue.backends._pushcache import PushCache
from aioqueue.backends.redis import RedisBackend
from aioqueue.backends.rpc import RpcBackend, _Received
from aioqueue.message import Outcome, States
from aioqueue.operations import list_dead, requeue_dead

pytestmark = pytest.mark.timeout(60)

GATES: dict[str, asyncio.Event] = {}


async def gated(key: str) -> str:
    """Finishes once the test sets ``GATES[key]``."""
    await GATES[key].wait()
    return key


def new_gate() -> str:
    key = uuid.uuid4().hex
    GATES[key] = asyncio.Event()
    return key


def success(app: App, task_id: str, value: Any) -> bytes:
    return app.codec.encode_outcome(Outcome(task_id=task_id, state=States.SUCCESS, result=value))


async def store(app: App, task_id: str, value: Any, ttl: float = 60) -> None:
    """Store a SUCCESS the way a worker does (no reply_to: as for another process's task)."""
    await app.backend.store(task_id, success(app, task_id, value), ttl=ttl, reply_to=None)


async def connections_named(raw: aioredis.Redis, name: str) -> int:
    return sum(1 for c in await raw.client_list() if c["name"] == name)


# -- 1. any number of waiters in one process: one connection, no pool limit ----------------


async def test_5000_foreign_waiters_use_a_bounded_number_of_connections(
    redis_url: str, key_prefix: str, redis_cleanup: None, raw: aioredis.Redis
) -> None:
    """Waiters on tasks another process sent read through the batcher, not one pool link each."""
    name = f"waiters-{uuid.uuid4().hex[:8]}"
    writer = App("writer", broker=redis_url, key_prefix=key_prefix)
    reader = App(name, broker=redis_url, key_prefix=key_prefix)
    ids = [f"w{i}" for i in range(5000)]
    peak = 0
    async with writer, reader:
        # half of the results are stored before their waiters start, half after
        for task_id in ids[::2]:
            await writer.backend.store(
                task_id, success(writer, task_id, task_id), ttl=60, reply_to=None
            )

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, await connections_named(raw, f"aioqueue:{name}:results"))
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        try:
            waiting = [asyncio.create_task(reader.AsyncResult(i).get(timeout=40)) for i in ids]
            await asyncio.sleep(0)  # let every waiter start before the rest are stored
            for task_id in ids[1::2]:
                await writer.backend.store(
                    task_id, success(writer, task_id, task_id), ttl=60, reply_to=None
                )
            values = await asyncio.gather(*waiting)
        finally:
            # ended here, not by the loop's teardown: a sampler cancelled in the middle of a
            # command while the ``raw`` fixture closes its client hung the teardown (60 s)
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        assert values == ids
        assert 1 <= peak <= 3, peak


async def test_a_wait_is_bounded_while_the_result_listener_is_not_listening_yet(
    redis_url: str, key_prefix: str, redis_cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """get(timeout=) counts the listener's start: a listener that never confirms its reply
    channel makes the wait raise ResultTimeout, not hang past its timeout."""
    reader = App(f"stuck-{uuid.uuid4().hex[:8]}", broker=redis_url, key_prefix=key_prefix)
    async with reader:
        backend = reader.backend
        assert isinstance(backend, RedisBackend)
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def stuck() -> None:
            await never

        monkeypatch.setattr(backend.listener, "start", stuck)
        with pytest.raises(ResultTimeout, match="not listening yet"):
            async with asyncio.timeout(5):  # a hang fails here, not at the suite's timeout
                await reader.AsyncResult("nobody").get(timeout=0.3)


async def test_a_listener_whose_first_subscribe_was_lost_listens_within_seconds(
    redis_url: str, key_prefix: str, redis_cleanup: None
) -> None:
    """The first write on a new listener connection never reaches the server: the probe a
    second later sends the subscriptions again (before, nothing came for ping_interval, 30 s,
    and every waiter waited on start() meanwhile)."""
    reader = App(f"lost-{uuid.uuid4().hex[:8]}", broker=redis_url, key_prefix=key_prefix)
    backend = reader.backend
    assert isinstance(backend, RedisBackend)
    listener = backend.listener
    dropped: list[int] = []
    connect = listener._new_connection

    def lossy() -> Any:
        conn = connect()
        send, handshake = conn.send_packed_command, conn.connect

        async def first_lost(command: Any, check_health: bool = True) -> None:
            if not dropped:
                dropped.append(1)
                return
            await send(command, check_health=check_health)

        async def connect_then_lose() -> None:
            await handshake()  # its own commands go through
            conn.send_packed_command = first_lost

        conn.connect = connect_then_lose
        return conn

    listener._new_connection = lossy
    async with reader:
        async with asyncio.timeout(5):
            await listener.start()
        assert dropped == [1]
        assert listener.epoch == 1  # listening, on that very connection


# -- 2. two waiters on one id --------------------------------------------------------------


async def test_two_foreign_waiters_on_one_id_are_independent(
    redis_url: str, key_prefix: str, redis_cleanup: None, raw: aioredis.Redis
) -> None:
    writer = App("writer", broker=redis_url, key_prefix=key_prefix)
    reader = App("reader", broker=redis_url, key_prefix=key_prefix)
    channel = f"{key_prefix}:done:shared"

    async def subscribed() -> bool:
        return bool(dict(await raw.pubsub_numsub(channel)).get(channel.encode(), 0))

    async with writer, reader:
        patient = asyncio.create_task(reader.AsyncResult("shared").get(timeout=20))
        with pytest.raises(ResultTimeout):
            await reader.AsyncResult("shared").get(timeout=0.2)
        await wait_until(subscribed)  # the first to leave kept the channel for the other
        assert not patient.done()
        await store(writer, "shared", 7)
        assert await patient == 7
        await wait_until(lambda: _not(subscribed))


async def _not(predicate: Any) -> bool:
    return not await predicate()


@pytest.mark.parametrize("transport", ["memory", "redis", "amqp-rpc"])
async def test_two_waiters_in_the_sending_process(make_app: AppFactory) -> None:
    app = make_app()
    task = app.task(gated)
    gate = new_gate()
    async with app, running_worker(app):
        result = await task.send(gate)
        patient = asyncio.create_task(result.get(timeout=20))
        with pytest.raises(ResultTimeout):
            await result.get(timeout=0.2)
        assert not patient.done()
        GATES[gate].set()
        assert await patient == gate


# -- 3. a handle kept across App.close() and a new connection --------------------------------


async def test_redis_handle_survives_app_reconnect(
    redis_url: str, key_prefix: str, redis_cleanup: None
) -> None:
    sender = App("sender", broker=redis_url, key_prefix=key_prefix)
    worker_app = App("worker", broker=redis_url, key_prefix=key_prefix)
    task = sender.task(gated)
    worker_app.task(gated)
    early, late = new_gate(), new_gate()
    GATES[early].set()
    async with worker_app, running_worker(worker_app):
        await sender.connect()
        done_before = await task.send(early)
        assert await done_before.get(timeout=10) == early  # pushed into the old listener
        pending = await task.send(late)
        await sender.close()
        await sender.connect()
        try:
            GATES[late].set()
            assert await pending.get(timeout=10) == late
            assert await done_before.get(timeout=10) == early
        finally:
            await sender.close()


async def test_rpc_handle_from_a_closed_app_fails_fast(key_prefix: str) -> None:
    """rpc:// cannot read a result pushed to a reply queue that is gone: it says so at once."""
    require_server(AMQP_URL, "RabbitMQ")
    sender = App("sender", broker=AMQP_URL, backend="rpc://", key_prefix=key_prefix)
    worker_app = App(
        "worker",
        broker=AMQP_URL,
        backend="rpc://",
        key_prefix=key_prefix,
        amqp_delete_queues_on_close=True,
    )
    task = sender.task(gated)
    worker_app.task(gated)
    gate = new_gate()
    async with worker_app, running_worker(worker_app):
        await sender.connect()
        pending = await task.send(gate)
        await sender.close()
        await sender.connect()
        try:
            started = time.monotonic()
            with pytest.raises(ResultBackendError, match="no longer"):
                await pending.get(timeout=10)
            assert time.monotonic() - started < 2
        finally:
            GATES[gate].set()
            await sender.close()


# -- 9 / 18a. the sending process's local copy obeys forget() and the TTL --------------------


async def test_forget_clears_every_local_copy(make_app: AppFactory) -> None:
    app = make_app()
    task = app.task(gated)
    gate = new_gate()
    GATES[gate].set()
    async with app, running_worker(app):
        result = await task.send(gate)
        assert await result.get(timeout=10) == gate
        other = app.AsyncResult(result.id)
        assert await other.get(timeout=10) == gate
        await result.forget()
        assert await result.state() == States.PENDING
        with pytest.raises(ResultTimeout):
            await result.get(timeout=0.2)
        with pytest.raises((ResultTimeout, ResultBackendError)):
            await other.get(timeout=0.2)
        assert await other.state() == States.PENDING


@pytest.mark.parametrize("transport", ["redis", "amqp-redis"])
async def test_a_requeue_elsewhere_clears_the_failure_pushed_here(make_app: AppFactory) -> None:
    """A dead letter requeued by another process (an operator's CLI) runs again under its id:
    the sender, which had the old failure pushed to it, must wait for the new run, not keep
    answering the failure from its copy."""
    sender, operator = make_app("sender"), make_app("operator")
    async with sender, operator:
        async with running_worker(operator):  # "waiters.late" is not registered there yet
            result = await sender.send_task("waiters.late", [5])
            with pytest.raises(TaskNotRegistered):
                await result.get(timeout=10)

            async def dead_lettered() -> bool:
                return len(await list_dead(operator, "default")) == 1

            await wait_until(dead_lettered)

        @operator.task(name="waiters.late")
        async def late(n: int) -> int:
            return n * 10

        assert await requeue_dead(operator, "default", frozenset({result.id})) == 1

        async def forgotten_here() -> bool:
            return await result.state() != States.FAILURE

        await wait_until(forgotten_here, timeout=5)
        async with running_worker(operator):
            assert await result.get(timeout=10) == 50


@pytest.mark.parametrize("transport", ["memory", "amqp-rpc", "redis", "amqp-redis"])
async def test_expired_results_are_gone_in_the_sending_process(make_app: AppFactory) -> None:
    app = make_app()
    task = app.task(gated)
    gate = new_gate()
    GATES[gate].set()
    async with app, running_worker(app):
        result = await task.options(result_ttl=0.3).send(gate)
        assert await result.get(timeout=10) == gate

        async def expired() -> bool:
            return await result.state() == States.PENDING

        await wait_until(expired, timeout=5)
        with pytest.raises(ResultTimeout):
            await result.get(timeout=0.2)


async def test_redis_reply_frames_carry_the_ttl(
    redis_url: str, key_prefix: str, redis_cleanup: None, raw: aioredis.Redis
) -> None:
    """A pushed outcome is kept here for the TTL its frame names, like its key in Redis."""
    app = App("ttl-frames", broker=redis_url, key_prefix=key_prefix)
    async with app:
        backend = app.backend
        reply_to, token = backend.reply_to(), backend.send_token()
        assert reply_to is not None
        outcome = success(app, "t", 5)
        await raw.set(f"{key_prefix}:result:t", outcome, px=300)
        await raw.publish(reply_to, b"t 0.3 " + outcome)
        result: AsyncResult[int] = AsyncResult("t", app, token=token)
        assert await result.get(timeout=5) == 5

        async def expired() -> bool:
            return await result.state() == States.PENDING

        await wait_until(expired, timeout=5)
        with pytest.raises(ResultTimeout):
            await result.get(timeout=0.2)
        # the older frame without a TTL is still understood
        await raw.publish(reply_to, b"old " + success(app, "old", 6))
        assert await AsyncResult("old", app, token=token).get(timeout=5) == 6


async def test_redis_push_cache_is_bounded_by_bytes(
    redis_url: str, key_prefix: str, redis_cleanup: None, raw: aioredis.Redis
) -> None:
    """Past the bound the oldest pushes go; their waiters then read the key instead."""
    app = App("bounded", broker=redis_url, key_prefix=key_prefix)
    big = "x" * (1024 * 1024)
    async with app:
        backend = app.backend
        reply_to, token = backend.reply_to(), backend.send_token()
        assert reply_to is not None
        cache = backend.listener.cache
        ids = [f"big{i}" for i in range(20)]
        for task_id in ids:
            outcome = success(app, task_id, big)
            await raw.set(f"{key_prefix}:result:{task_id}", outcome, px=60_000)
            await raw.publish(reply_to, f"{task_id} 60 ".encode() + outcome)
        await raw.publish(reply_to, b"huge 60 {" + b"y" * cache.max_bytes)

        async def all_pushed() -> bool:
            return cache.was_dropped("huge")

        await wait_until(all_pushed)
        assert cache.nbytes <= cache.max_bytes
        assert cache.get(ids[0]) is None and cache.get(ids[-1]) is not None
        assert cache.get("huge") is None
        assert backend.send_token() != token  # evictions: a handle from before must read
        first: AsyncResult[str] = AsyncResult(ids[0], app, token=token)
        assert await first.get(timeout=5) == big


async def test_pushed_wait_costs_no_read_and_no_subscription(
    redis_url: str, key_prefix: str, redis_cleanup: None
) -> None:
    sender = App("pushed", broker=redis_url, key_prefix=key_prefix)
    worker_app = App("pushed-worker", broker=redis_url, key_prefix=key_prefix)
    task = sender.task(gated)
    worker_app.task(gated)
    gate = new_gate()
    async with worker_app, running_worker(worker_app), sender:
        backend = sender.backend
        result = await task.send(gate)
        reads = subscriptions = 0
        run, acquire = backend.batcher.run, backend.listener.acquire_done

        async def counting_run(stage: Any) -> Any:
            nonlocal reads
            reads += 1
            return await run(stage)

        def counting_acquire(task_id: str) -> Any:
            nonlocal subscriptions
            subscriptions += 1
            return acquire(task_id)

        backend.batcher.run = counting_run  # type: ignore[method-assign]
        backend.listener.acquire_done = counting_acquire  # type: ignore[method-assign]
        waiting = asyncio.create_task(result.get(timeout=10))
        GATES[gate].set()
        assert await waiting == gate
        assert await result.get(timeout=10) == gate  # again: from the local copy
        assert (reads, subscriptions) == (0, 0)
        assert await result.state() == States.SUCCESS


# -- a backend that goes away during a wait ----------------------------------------------------


async def test_waiters_keep_waiting_through_a_backend_outage(private_redis: PrivateRedis) -> None:
    url = f"redis://127.0.0.1:{private_redis.port}/0"
    await wait_until(lambda: port_open(private_redis.port))
    client = App("client", broker=url, broker_connect_timeout=0.5)
    writer = App("writer", broker=url)
    async with client:
        before = asyncio.create_task(client.AsyncResult("before").get(timeout=30))
        probe = aioredis.Redis.from_url(url)
        channel = f"{client.conf.key_prefix}:done:before"

        async def subscribed() -> bool:
            return bool(dict(await probe.pubsub_numsub(channel)).get(channel.encode(), 0))

        await wait_until(subscribed)
        await probe.aclose()
        private_redis.kill()
        during = asyncio.create_task(client.AsyncResult("during").get(timeout=30))
        started = time.monotonic()
        with pytest.raises(ResultTimeout):
            await client.AsyncResult("short").get(timeout=0.5)
        assert time.monotonic() - started < 3
        assert not before.done() and not during.done()

        private_redis.start()
        await wait_until(lambda: port_open(private_redis.port))
        async with writer:
            for task_id in ("before", "during"):
                await store(writer, task_id, task_id)
            assert await before == "before"
            assert await during == "during"


# -- unit tests on fakes: the push cache ------------------------------------------------------


def test_push_cache_is_bounded_by_bytes_oldest_out_first() -> None:
    cache = PushCache(max_bytes=10_000)
    for i in range(30):
        cache.put(f"t{i}", b"x" * 1000, ttl=60)
    assert cache.nbytes <= 10_000
    assert cache.get("t0") is None and cache.was_dropped("t0")
    assert cache.get("t29") == b"x" * 1000
    assert cache.evictions == 30 - len(cache)
    cache.put("t29", b"y", ttl=60)  # replacing an entry frees its old size
    assert cache.get("t29") == b"y"
    assert cache.nbytes < 10_000 - 900


def test_push_cache_keeps_no_outcome_bigger_than_its_bound() -> None:
    cache = PushCache(max_bytes=10_000)
    cache.put("small", b"s", ttl=60)
    cache.put("big", b"x" * 10_000, ttl=60)
    assert cache.get("big") is None and cache.was_dropped("big")
    assert cache.get("small") == b"s"  # nothing else was pushed out for it
    assert cache.evictions == 1


async def test_push_cache_entries_expire_and_can_be_forgotten() -> None:
    cache = PushCache()
    cache.put("short", b"s", ttl=0.05)
    cache.put("long", b"l", ttl=60)
    cache.put("none", b"n", ttl=0)
    cache.put("nan", b"n", ttl=float("nan"))
    cache.put("forever", b"f", ttl=float("inf"))
    assert cache.get("none") is None and cache.get("nan") is None
    assert cache.get("forever") == b"f"

    async def short_gone() -> bool:
        return cache.get("short") is None

    await wait_until(short_gone, timeout=5)
    assert cache.get("long") == b"l"
    cache.pop("long")
    assert cache.get("long") is None and len(cache) == 1
    assert cache.evictions == 0  # expiry and forget are not evictions


def test_parse_reply_frames() -> None:
    assert parse_reply(b'id1 60 {"v":1}') == ("id1", 60.0, b'{"v":1}')
    assert parse_reply(b"id1 0.25 \x82\xa1") == ("id1", 0.25, b"\x82\xa1")
    assert parse_reply(b'id1 {"v": 1, "a": 2}') == ("id1", None, b'{"v": 1, "a": 2}')
    assert parse_reply(b"id1 \x82\xa1 x") == ("id1", None, b"\x82\xa1 x")
    assert parse_reply(b"id1 12x {}") == ("id1", None, b"12x {}")


# -- unit tests on fakes: the listener's subscriptions, dispatch and reconnects ---------------


class FakeRedis:
    """What the listener's connection and the batcher see: commands in, frames out."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.connections: list[FakeConnection] = []
        self.down = False
        self.hold_confirmations = False
        self.answer_ping = True
        self.read_failures: list[Exception] = []
        self.reads: list[tuple[str, ...]] = []

    @property
    def conn(self) -> FakeConnection:
        return self.connections[-1]

    def new_connection(self) -> FakeConnection:
        conn = FakeConnection(self)
        self.connections.append(conn)
        return conn

    def commands(self, name: str) -> list[list[str]]:
        return [c[1:] for conn in self.connections for c in conn.commands if c[0] == name]

    async def run(self, stage: Any) -> Any:
        """The batcher: answers GET / MGET / DEL / PING from ``values``."""
        if self.read_failures:
            raise self.read_failures.pop(0)
        await asyncio.sleep(0.001)  # a round trip, during which more reads queue up
        pipe = Commands()
        stage(pipe)
        replies: list[Any] = []
        for name, *args in pipe.stack:
            self.reads.append((name, *args))
            if name == "GET":
                replies.append(self.values.get(args[0]))
            elif name == "MGET":
                replies.append([self.values.get(k) for k in args])
            elif name == "DEL":
                replies.append(sum(self.values.pop(k, None) is not None for k in args))
            else:
                replies.append(b"PONG")
        return replies[-1]

    async def aclose(self) -> None:
        return None


class FakeConnection:
    def __init__(self, server: FakeRedis) -> None:
        self.server = server
        self.is_connected = False
        self.frames: asyncio.Queue[Any] = asyncio.Queue()
        self.commands: list[list[str]] = []

    async def connect(self) -> None:
        if self.server.down:
            raise ConnectionError("connection refused")
        self.is_connected = True

    async def send_packed_command(self, payload: list[bytes], check_health: bool = True) -> None:
        assert not check_health  # a health check would read a frame meant for the reader
        reader = hiredis.Reader()
        for chunk in payload:
            reader.feed(chunk)
        while (command := reader.gets()) is not False:
            name, *args = [part.decode() for part in command]
            self.commands.append([name, *args])
            for channel in args:
                if name == "SUBSCRIBE" and not self.server.hold_confirmations:
                    self.push(b"subscribe", channel.encode(), 1)
                elif name == "UNSUBSCRIBE":
                    self.push(b"unsubscribe", channel.encode(), 0)
            if name == "PING" and self.server.answer_ping:
                self.frames.put_nowait([b"pong", b""])

    def push(self, kind: bytes, channel: bytes, data: Any) -> None:
        self.frames.put_nowait([kind, channel, data])

    def confirm_all(self) -> None:
        for command in self.commands:
            if command[0] == "SUBSCRIBE":
                for channel in command[1:]:
                    self.push(b"subscribe", channel.encode(), 1)

    async def read_response(self, disable_decoding: bool = False, timeout: Any = None) -> Any:
        try:
            frame = await asyncio.wait_for(self.frames.get(), timeout)
        except TimeoutError:
            return None
        if isinstance(frame, Exception):
            raise frame
        return frame

    async def disconnect(self, nowait: bool = False) -> None:
        if self.is_connected:
            self.is_connected = False
            self.frames.put_nowait(ConnectionError("connection closed"))


@pytest.fixture
async def fake() -> AsyncIterator[tuple[RedisBackend, FakeRedis]]:
    server = FakeRedis()
    backend = RedisBackend("redis://127.0.0.1:1/0", key_prefix="p")
    backend._pubsub_connection = server.new_connection  # type: ignore[method-assign]
    backend.batcher = server  # type: ignore[assignment]
    yield backend, server
    await backend.aclose()


def frame_for(task_id: str, value: int, ttl: float | None = 60) -> bytes:
    codec = App("unit", broker="memory://").codec
    outcome = codec.encode_outcome(Outcome(task_id=task_id, state=States.SUCCESS, result=value))
    return f"{task_id} {'' if ttl is None else f'{ttl} '}".encode() + outcome


async def test_listener_subscribes_once_per_id_and_the_last_waiter_unsubscribes(
    fake: tuple[RedisBackend, FakeRedis],
) -> None:
    backend, server = fake
    await backend.start_listening()
    first = asyncio.create_task(backend.wait("x", timeout=0.1))
    second = asyncio.create_task(backend.wait("x", timeout=10))
    with pytest.raises(ResultTimeout):
        await first
    assert server.commands("SUBSCRIBE")[1:] == [["p:done:x"]]
    assert server.commands("UNSUBSCRIBE") == []
    server.values["p:result:x"] = b"stored"
    server.conn.push(b"message", b"p:done:x", b"")
    assert await second == b"stored"

    async def unsubscribed() -> bool:
        return server.commands("UNSUBSCRIBE") == [["p:done:x"]]

    await wait_until(unsubscribed)


async def test_listener_batches_concurrent_subscriptions(
    fake: tuple[RedisBackend, FakeRedis],
) -> None:
    backend, server = fake
    await backend.start_listening()
    waiting = [asyncio.create_task(backend.wait(f"t{i}", timeout=10)) for i in range(1000)]

    async def all_read() -> bool:
        return len(server.reads) == 1000

    await wait_until(all_read)
    subscribes = server.commands("SUBSCRIBE")[1:]
    assert len(subscribes) <= 2
    assert sum(len(c) for c in subscribes) == 1000
    for i in range(1000):
        server.values[f"p:result:t{i}"] = str(i).encode()
        server.conn.push(b"message", f"p:done:t{i}".encode(), b"")
    assert await asyncio.gather(*waiting) == [str(i).encode() for i in range(1000)]
    mgets = [read for read in server.reads if read[0] == "MGET"]
    assert len(mgets) < 100  # done notices are read back by MGET, coalesced


async def test_listener_keeps_subscriptions_of_a_cancelled_writer_safe(
    fake: tuple[RedisBackend, FakeRedis],
) -> None:
    """A waiter cancelled while its SUBSCRIBE is unconfirmed breaks nothing for the others."""
    backend, server = fake
    await backend.start_listening()
    server.hold_confirmations = True
    leaving = asyncio.create_task(backend.wait("a", timeout=10))
    staying = asyncio.create_task(backend.wait("a", timeout=10))

    async def sent() -> bool:
        return server.commands("SUBSCRIBE")[1:] == [["p:done:a"]]

    await wait_until(sent)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert server.conn.is_connected and len(server.connections) == 1
    server.values["p:result:a"] = b"v"
    server.conn.confirm_all()
    assert await staying == b"v"


async def test_listener_dispatches_replies_to_every_waiter_and_caches_them(
    fake: tuple[RedisBackend, FakeRedis],
) -> None:
    backend, server = fake
    await backend.start_listening()
    token = backend.send_token()
    channel = backend.listener.channel.encode()
    waiters = [asyncio.create_task(backend.wait("r", timeout=10, token=token)) for _ in range(3)]
    await asyncio.sleep(0)
    server.conn.push(b"message", channel, frame_for("r", 1, ttl=0.05))
    values = await asyncio.gather(*waiters)
    assert len(set(values)) == 1 and b'"result":1' in values[0]
    assert server.commands("SUBSCRIBE")[1:] == [] and server.reads == []
    assert await backend.get("r") == values[0]  # state() reads the local copy: no round trip

    async def expired() -> bool:
        return backend.listener.cache.get("r") is None

    await wait_until(expired, timeout=5)
    server.conn.push(b"message", channel, frame_for("old", 2, ttl=None))
    assert b'"result":2' in await backend.wait("old", timeout=5, token=token)
    assert await backend.get("old") is None  # its TTL is unknown here: state() asks Redis
    assert server.reads == [("MGET", "p:result:old", "p:state:old")]
    await backend.forget("old")
    assert backend.listener.cache.get("old") is None


async def test_listener_resubscribes_then_rereads_after_a_reconnect(
    fake: tuple[RedisBackend, FakeRedis],
) -> None:
    backend, server = fake
    await backend.start_listening()
    token = backend.send_token()
    pushed = asyncio.create_task(backend.wait("pushed", timeout=10, token=token))
    foreign = asyncio.create_task(backend.wait("foreign", timeout=10))

    async def foreign_read() -> bool:
        return ("GET", "p:result:foreign") in server.reads

    await wait_until(foreign_read)
    server.hold_confirmations = True
    server.down = True
    await server.conn.disconnect()
    server.values["p:result:pushed"] = b"P"
    server.values["p:result:foreign"] = b"F"
    server.down = False

    async def resubscribed() -> bool:
        return len(server.connections) == 2 and bool(server.conn.commands)

    await wait_until(resubscribed)
    (command,) = server.conn.commands
    reply_last = ["SUBSCRIBE", "p:done:foreign", "p:forgotten", backend.listener.channel]
    assert command == reply_last
    assert not pushed.done() and not foreign.done()  # nothing is read before it is in place
    server.conn.confirm_all()
    assert await pushed == b"P" and await foreign == b"F"
    assert backend.send_token() != token


async def test_a_push_lost_with_the_connection_up_costs_an_interval_not_the_wait(
    fake: tuple[RedisBackend, FakeRedis],
) -> None:
    """The outcome is stored but its push never arrives (a cluster's bus dropped it): a wait
    still waiting after a whole recheck interval has its key read, pushed or subscribed, in one
    MGET (test_pushed_wait_costs_no_read_and_no_subscription: a short wait is never read)."""
    backend, server = fake
    backend.listener.recheck_interval = 0.2
    await backend.start_listening()
    token = backend.send_token()
    pushed = asyncio.create_task(backend.wait("pushed", timeout=10, token=token))
    foreign = asyncio.create_task(backend.wait("foreign", timeout=10))

    async def subscribed() -> bool:
        return ("GET", "p:result:foreign") in server.reads

    await wait_until(subscribed)
    server.conn.confirm_all()
    await asyncio.sleep(0.05)
    epoch = backend.listener.epoch
    server.reads.clear()
    server.values["p:result:pushed"] = b"P"
    server.values["p:result:foreign"] = b"F"
    assert await asyncio.wait_for(asyncio.gather(pushed, foreign), 5) == [b"P", b"F"]
    assert backend.listener.epoch == epoch  # no reconnect: no re-read after one
    (recheck,) = server.reads
    assert recheck[0] == "MGET"
    assert sorted(recheck[1:]) == ["p:result:foreign", "p:result:pushed"]


async def test_listener_probes_a_silent_link_and_reconnects(
    fake: tuple[RedisBackend, FakeRedis],
) -> None:
    backend, server = fake
    backend.listener.ping_interval = 0.05
    await backend.start_listening()

    async def pinged() -> bool:
        return ["PING"] in [c[:1] for c in server.connections[0].commands]

    await wait_until(pinged)
    assert len(server.connections) == 1  # answered: the link is fine
    server.answer_ping = False

    async def reconnected() -> bool:
        return len(server.connections) >= 2

    await wait_until(reconnected)


async def test_reads_are_retried_while_the_backend_is_down(
    fake: tuple[RedisBackend, FakeRedis], caplog: pytest.LogCaptureFixture
) -> None:
    backend, server = fake
    await backend.start_listening()
    down = ResultBackendError("cannot reach result backend")
    down.__cause__ = redis_errors.ConnectionError("refused")
    server.read_failures = [down, down, down]
    waiting = asyncio.create_task(backend.wait("late", timeout=10))
    server.values["p:result:late"] = b"here"
    assert await waiting == b"here"
    assert "retrying" in caplog.text


async def test_a_refused_read_fails_the_wait(fake: tuple[RedisBackend, FakeRedis]) -> None:
    backend, server = fake
    await backend.start_listening()
    refused = ResultBackendError("NOPERM")
    refused.__cause__ = redis_errors.NoPermissionError("NOPERM no permissions")
    server.read_failures = [refused]
    with pytest.raises(ResultBackendError, match="NOPERM"):
        await backend.wait("denied", timeout=10)


async def test_closing_fails_waiters_instead_of_leaving_them_hanging(
    fake: tuple[RedisBackend, FakeRedis],
) -> None:
    backend, server = fake
    await backend.start_listening()
    server.hold_confirmations = True
    subscribing = asyncio.create_task(backend.wait("s", timeout=10))
    pushed = asyncio.create_task(backend.wait("p", timeout=10, token=backend.send_token()))

    async def sent() -> bool:
        return len(server.commands("SUBSCRIBE")) == 2

    await wait_until(sent)
    await backend.aclose()
    for waiting in (subscribing, pushed):
        with pytest.raises(ResultBackendError, match="closed"):
            await waiting


async def test_first_connection_failure_is_reported(fake: tuple[RedisBackend, FakeRedis]) -> None:
    backend, server = fake
    server.down = True
    with pytest.raises(ResultBackendError, match="cannot listen"):
        await backend.start_listening()
    server.down = False
    await backend.start_listening()  # a later call tries again
    assert backend.reply_to() is not None


async def test_rpc_fails_fast_where_no_reply_can_come() -> None:
    backend = RpcBackend(AMQP_URL)
    backend._reply_queue = "q-now"  # as start_listening leaves it, without a broker
    backend._received = _Received(max_bytes=1000)
    backend._record("final", "big", b"x" * 2000, 60)
    with pytest.raises(ResultBackendError, match="dropped"):
        await backend.wait("big", timeout=5, token="q-now")
    with pytest.raises(ResultBackendError, match="no longer listens"):
        await backend.wait("any", timeout=5, token="q-before")
    with pytest.raises(ResultBackendError, match="only to the process that sent it"):
        await backend.wait("any", timeout=5, token=None)
    waiting = [asyncio.create_task(backend.wait("t", timeout=5, token="q-now")) for _ in range(2)]
    with pytest.raises(ResultTimeout):
        await backend.wait("t", timeout=0.05, token="q-now")
    backend._record("final", "t", b"done", 60)
    assert await asyncio.gather(*waiting) == [b"done", b"done"]
    await backend.forget("t")
    assert await backend.get("t") is None
