"""The Redis plumbing under the broker and the backend: the command batcher, its connection,
the redis-py clients' limits, and the eviction-policy check.

The batcher's faults (a connection dying mid-batch, a server that never answers) are played by
a small fake server on a free loopback port that speaks just enough RESP and records every
command it got; the rest runs against the shared Redis or a private ``redis-server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis.asyncio
from conftest import IN_CI, wait_until
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool

from aioqueue import BrokerConnectionError, BrokerError
from aioqueue._redis import (
    BIG_ARGUMENT,
    CommandBatcher,
    Commands,
    Script,
    connect_redis,
    eviction_warning,
    pack,
    redis_errors_as,
)

pytestmark = pytest.mark.timeout(30)

Reply = bytes | None
DROP = b"<drop>"  # the fake writes the replies so far, then kills the connection


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class FakeRedis:
    """Answers every command with its last argument (a bulk string), unless told otherwise.

    ``rules`` maps a last argument to a reply: raw RESP bytes, ``None`` for no answer at all,
    ``DROP`` to cut the connection there, or an awaitable factory to hold the answer back.
    """

    def __init__(self) -> None:
        self.commands: list[list[bytes]] = []
        self.connections = 0
        self.rules: dict[bytes, Reply | Callable[[], Awaitable[Reply]]] = {}
        self.auth_reply = b"+OK\r\n"
        self.scripts_lost = False
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: set[asyncio.Task[Any]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, auth: str = "", path: str = "/0") -> str:
        return f"redis://{auth}127.0.0.1:{self.port}{path}"

    def values(self) -> list[bytes]:
        """Last arguments of the data commands, in the order the server got them."""
        skip = {b"CLIENT", b"AUTH", b"SELECT", b"PING"}
        return [c[-1] for c in self.commands if c[0] not in skip]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                out: list[bytes] = []
                while (command := parser.gets()) is not False:
                    self.commands.append(command)
                    reply = await self._answer(command)
                    if reply is DROP:
                        writer.write(b"".join(out))
                        await writer.drain()
                        writer.transport.abort()
                        return
                    if reply is not None:
                        out.append(reply)
                writer.write(b"".join(out))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _answer(self, command: list[bytes]) -> Reply:
        if command[0] == b"AUTH":
            return self.auth_reply
        if command[0] in {b"CLIENT", b"SELECT"}:
            return b"+OK\r\n"
        if command[0] == b"PING":
            return b"+PONG\r\n"
        if command[0] == b"EVALSHA" and self.scripts_lost:
            self.scripts_lost = False
            return b"-NOSCRIPT No matching script. Please use EVAL.\r\n"
        rule = self.rules.get(command[-1], b"")
        if callable(rule):
            return await rule()
        return bulk(command[-1]) if rule == b"" else rule

    async def close(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def fake() -> AsyncIterator[FakeRedis]:
    server = FakeRedis()
    await server.start()
    yield server
    await server.close()


@contextlib.asynccontextmanager
async def batcher_for(url: str, **options: Any) -> AsyncIterator[CommandBatcher]:
    client = connect_redis(url, connect_timeout=2.0, client_name="aqtest")
    batcher = CommandBatcher(client, lambda: redis_errors_as(url), **options)
    try:
        yield batcher
    finally:
        await batcher.aclose()
        await client.aclose()


def push(value: bytes, key: str = "k") -> Callable[[Commands], None]:
    def stage(pipe: Commands) -> None:
        pipe.lpush(key, value)

    return stage


async def gated(fake: FakeRedis) -> tuple[asyncio.Event, Callable[[], Awaitable[Reply]]]:
    """A rule that holds its reply until the event is set: later stages pile up meanwhile."""
    release = asyncio.Event()

    async def hold() -> Reply:
        await release.wait()
        return bulk(b"gate")

    return release, hold


async def one_batch(batcher: CommandBatcher, fake: FakeRedis, values: list[bytes]) -> list[Any]:
    """Send ``values`` as one batch (behind a gate), returning each stage's result or error."""
    release, hold = await gated(fake)
    fake.rules[b"gate"] = hold
    gate = asyncio.ensure_future(batcher.run(push(b"gate")))
    await wait_until(_true_when(lambda: b"gate" in fake.values()))
    tasks = [asyncio.ensure_future(batcher.run(push(value))) for value in values]
    await asyncio.sleep(0)  # every task has submitted its stage
    release.set()
    assert await gate == b"gate"
    return await asyncio.gather(*tasks, return_exceptions=True)


def _true_when(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def predicate() -> bool:
        return check()

    return predicate


# -- the batcher on the fake ------------------------------------------------------------------


async def test_concurrent_stages_reach_the_server_in_submission_order(fake: FakeRedis) -> None:
    async with batcher_for(fake.url()) as batcher:
        values = [str(i).encode() for i in range(500)]
        results = await asyncio.gather(*[batcher.run(push(value)) for value in values])
    assert fake.values() == values
    assert results == values  # and each stage got the reply to its own command
    assert fake.connections == 1


async def test_a_stage_gets_the_reply_to_its_own_last_command(fake: FakeRedis) -> None:
    def several(tag: bytes) -> Callable[[Commands], None]:
        def stage(pipe: Commands) -> None:
            pipe.lpush("k", tag + b"-1")
            pipe.set("s", tag + b"-2", px=1000)
            pipe.publish("c", tag + b"-3")

        return stage

    async with batcher_for(fake.url()) as batcher:
        results = await asyncio.gather(*[batcher.run(several(b"%d" % i)) for i in range(50)])
        assert await batcher.run(lambda pipe: None) is None  # a stage with no command
    assert results == [b"%d-3" % i for i in range(50)]


async def test_an_error_reply_fails_only_its_own_stage(fake: FakeRedis) -> None:
    fake.rules[b"bad"] = b"-WRONGTYPE Operation against a key holding the wrong kind\r\n"
    async with batcher_for(fake.url()) as batcher:
        first, bad, last = await one_batch(batcher, fake, [b"a", b"bad", b"c"])
        assert (first, last) == (b"a", b"c")
        assert isinstance(bad, BrokerError) and not isinstance(bad, BrokerConnectionError)
        assert "WRONGTYPE" in str(bad)
        assert isinstance(bad.__cause__, redis_errors.ResponseError)
        assert await batcher.run(push(b"after")) == b"after"
    assert fake.connections == 1  # an error reply leaves the connection in a known state


async def test_a_value_that_cannot_be_sent_fails_only_its_own_stage(fake: FakeRedis) -> None:
    """A stage carrying something RESP cannot encode (here a dict) fails alone, as a BrokerError,
    both inline and inside a batch; the other stages of that batch are sent and answered."""

    def unsendable(pipe: Commands) -> None:
        pipe.publish("c", {"not": "bytes"})  # type: ignore[arg-type]

    async with batcher_for(fake.url()) as batcher:
        with pytest.raises(BrokerError, match="cannot send a command"):
            await batcher.run(unsendable)
        release, hold = await gated(fake)
        fake.rules[b"gate"] = hold
        gate = asyncio.ensure_future(batcher.run(push(b"gate")))
        await wait_until(_true_when(lambda: b"gate" in fake.values()))
        tasks = [
            asyncio.ensure_future(batcher.run(stage))
            for stage in (push(b"a"), unsendable, push(b"c"))
        ]
        await asyncio.sleep(0)
        release.set()
        assert await gate == b"gate"
        first, bad, last = await asyncio.gather(*tasks, return_exceptions=True)
        assert (first, last) == (b"a", b"c")
        assert isinstance(bad, BrokerError) and "cannot send a command" in str(bad)
    assert fake.connections == 1


async def test_a_connection_dying_mid_batch_fails_that_batch_and_the_next_reconnects(
    fake: FakeRedis,
) -> None:
    fake.rules[b"die"] = DROP
    async with batcher_for(fake.url()) as batcher:
        results = await one_batch(batcher, fake, [b"a", b"die", b"b", b"c"])
        # "a" was answered before the cut, but the batch as a whole is in doubt: all fail.
        assert all(isinstance(r, BrokerConnectionError) for r in results), results
        assert await batcher.run(push(b"next")) == b"next"
    assert fake.connections == 2


async def test_a_server_that_never_answers_fails_the_batch_at_the_deadline(
    fake: FakeRedis,
) -> None:
    fake.rules[b"hang"] = None
    async with batcher_for(fake.url(), reply_deadline=0.3) as batcher:
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await one_batch(batcher, fake, [b"a", b"hang", b"b"])
        assert loop.time() - started < 3.0
        assert all(isinstance(r, BrokerConnectionError) for r in results), results
        assert "within 0.3s" in str(results[0])
        fake.rules.pop(b"hang")
        assert await batcher.run(push(b"next")) == b"next"
    assert fake.connections == 2  # the silent connection was dropped, never reused


async def test_a_cancelled_caller_leaves_no_half_read_connection_behind(fake: FakeRedis) -> None:
    release, hold = await gated(fake)
    fake.rules[b"slow"] = hold
    async with batcher_for(fake.url()) as batcher:
        caller = asyncio.ensure_future(batcher.run(push(b"slow")))
        await wait_until(_true_when(lambda: b"slow" in fake.values()))
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        release.set()
        # The late reply to "slow" must not be taken for the reply to "next".
        assert await batcher.run(push(b"next")) == b"next"
    assert fake.connections == 2


async def test_a_connection_the_server_closed_while_idle_is_replaced_before_use(
    fake: FakeRedis,
) -> None:
    async with batcher_for(fake.url()) as batcher:
        assert await batcher.run(push(b"a")) == b"a"
        for writer in fake._writers:
            writer.close()
        await wait_until(_true_when(lambda: batcher._link is None or not batcher._link.usable))
        assert await batcher.run(push(b"b")) == b"b"  # no error for the caller
    assert fake.connections == 2


async def test_a_lost_script_is_sent_again_by_text(fake: FakeRedis) -> None:
    fake.scripts_lost = True  # as after a restart or SCRIPT FLUSH
    async with batcher_for(fake.url()) as batcher:
        assert await Script("return ARGV[1]").run(batcher, [], [b"v"]) == b"v"
    assert [c[0] for c in fake.commands if c[-1] == b"v"] == [b"EVALSHA", b"EVAL"]


async def test_the_connection_introduces_itself_from_the_url(fake: FakeRedis) -> None:
    async with batcher_for(fake.url("app:s3cret@", "/3")) as batcher:
        await batcher.run(push(b"a"))
    assert fake.commands[:3] == [
        [b"AUTH", b"app", b"s3cret"],
        [b"CLIENT", b"SETNAME", b"aqtest"],
        [b"SELECT", b"3"],
    ]
    fake.commands.clear()
    async with batcher_for(fake.url(path="/0?password=qu3ry")) as batcher:
        await batcher.run(push(b"a"))
    assert fake.commands[0] == [b"AUTH", b"qu3ry"]


async def test_a_refused_password_is_a_connection_error_without_the_password(
    fake: FakeRedis,
) -> None:
    fake.auth_reply = b"-WRONGPASS invalid username-password pair\r\n"
    url = fake.url(path="/0?password=s3cret")
    async with batcher_for(url) as batcher:
        with pytest.raises(BrokerConnectionError) as caught:
            await batcher.run(push(b"a"))
    assert "WRONGPASS" in str(caught.value)
    assert "s3cret" not in str(caught.value)


# -- the batcher on real servers --------------------------------------------------------------


async def test_batched_writes_land_in_order_on_redis(redis_url: str) -> None:
    key = f"aqtest-{uuid.uuid4().hex[:10]}:order"
    async with batcher_for(redis_url) as batcher:
        try:
            values = [str(i).encode() for i in range(300)]
            await asyncio.gather(*[batcher.run(push(value, key)) for value in values])
            stored = await batcher._client.lrange(key, 0, -1)
            assert list(reversed(stored)) == values
        finally:
            await batcher._client.delete(key)


def _every_kind_of_command(body: bytes) -> Commands:
    pipe = Commands()
    pipe.lpush("q", b"small", body)
    pipe.lrem("processing", -1, body)
    pipe.set("result", body, px=1500, nx=True)
    pipe.zadd("delayed", 1.25, body)
    pipe.publish("channel", body)
    pipe.evalsha("0" * 40, 2, "k1", body, 7, "text", body)
    pipe.xadd("events", "e", body, maxlen=10)
    pipe.ping()
    return pipe


@pytest.mark.parametrize("size", [BIG_ARGUMENT - 1, BIG_ARGUMENT, 100_000])
def test_big_arguments_go_out_uncopied_as_the_same_bytes_hiredis_packs(size: int) -> None:
    """A body of BIG_ARGUMENT bytes or more is its own piece of the payload, the caller's very
    object (no copy by the packer, none by a join); the pieces add up to hiredis's packing."""
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    commands = _every_kind_of_command(body)
    payload = pack(commands)
    expected = b"".join(hiredis.pack_command(command) for command in commands.stack)
    if size < BIG_ARGUMENT:
        assert payload == expected
        return
    assert isinstance(payload, list)
    assert b"".join(payload) == expected
    # each of the body's eight occurrences (one of them the second evalsha key) is uncopied
    assert sum(piece is body for piece in payload) == 8
    assert max(len(piece) for piece in payload if piece is not body) < 300


async def test_big_and_small_writes_of_one_batch_reach_redis_intact(redis_url: str) -> None:
    """Many concurrent writers, some with bodies past BIG_ARGUMENT, share batches: each value
    lands whole and in order, and the replies after a big piece still match their stages."""
    key = f"aqtest-{uuid.uuid4().hex[:10]}:big"
    values = [(b"%06d" % i) * (BIG_ARGUMENT // 3 if i % 3 == 0 else 1) for i in range(60)]
    async with batcher_for(redis_url) as batcher:
        try:
            lengths = await asyncio.gather(*[batcher.run(push(value, key)) for value in values])
            assert sorted(lengths) == list(range(1, 61))
            stored = await batcher._client.lrange(key, 0, -1)
            assert list(reversed(stored)) == values

            def remove(pipe: Commands) -> None:
                pipe.lrem(key, -1, values[0])
                pipe.lrem(key, -1, values[1])
                pipe.lrange(key, 0, 0)

            assert await batcher.run(remove) == [values[-1]]
            assert await batcher._client.llen(key) == 58
        finally:
            await batcher._client.delete(key)


class PrivateRedis:
    """A redis-server of this test's own on a free port; ended by its pid."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        self.port = _free_port()
        self.socket = str(workdir / "redis.sock")
        self.proc = subprocess.Popen(
            [
                "redis-server",
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--unixsocket", self.socket, "--save", "", "--appendonly", "no"),
                *("--dir", str(workdir)),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def ready(self) -> None:
        await wait_until(_true_when(lambda: _port_open(self.port)), timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.2):
            return True
    except OSError:
        return False


def _need_redis_server() -> None:
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("redis-server is needed for the private-server tests")
        pytest.skip("redis-server not installed")


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[..., PrivateRedis]]:
    _need_redis_server()
    started: list[PrivateRedis] = []

    def start(*extra: str) -> PrivateRedis:
        server = PrivateRedis(tmp_path, *extra)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


async def test_unix_socket_and_db_from_the_url(private_redis: Callable[..., PrivateRedis]) -> None:
    server = private_redis()
    await server.ready()
    async with batcher_for(f"unix://{server.socket}?db=2") as batcher:
        await batcher.run(push(b"over-unix", "k"))
        # The redis-py client beside it takes the same URL (no TCP-only options on a socket).
        assert await batcher._client.lrange("k", 0, -1) == [b"over-unix"]
    other = connect_redis(server.url.replace("/0", "/2"), connect_timeout=2, client_name="t")
    try:
        assert await other.lrange("k", 0, -1) == [b"over-unix"]
    finally:
        await other.aclose()


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1, made with the openssl command line."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_tls_for_rediss_urls(
    private_redis: Callable[..., PrivateRedis], self_signed: tuple[Path, Path]
) -> None:
    cert, key = self_signed
    tls_port = _free_port()
    server = private_redis(
        *("--tls-port", str(tls_port), "--tls-cert-file", str(cert)),
        *("--tls-key-file", str(key), "--tls-ca-cert-file", str(cert)),
        *("--tls-auth-clients", "no"),
    )
    await server.ready()
    await wait_until(_true_when(lambda: _port_open(tls_port)), timeout=10)
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"
    async with batcher_for(url) as batcher:
        await batcher.run(push(b"over-tls", "k"))
        assert await batcher._client.lrange("k", 0, -1) == [b"over-tls"]
    # An unknown certificate is refused, as redis-py would refuse it.
    async with batcher_for(f"rediss://127.0.0.1:{tls_port}/0") as batcher:
        with pytest.raises(BrokerConnectionError):
            await batcher.run(push(b"x", "k"))


# -- redis-py clients: timeouts and a pool that queues ----------------------------------------


async def test_a_full_pool_queues_callers_instead_of_failing(redis_url: str) -> None:
    client = connect_redis(redis_url, connect_timeout=2, client_name="t", max_connections=2)
    assert isinstance(client.connection_pool, BlockingConnectionPool)
    key = f"aqtest-{uuid.uuid4().hex[:10]}:empty"
    try:
        # Six blocking pops of 0.1 s on two connections: the last ones wait for a turn.
        results = await asyncio.gather(*[client.blpop([key], timeout=0.1) for _ in range(6)])
        assert results == [None] * 6
    finally:
        await client.aclose()


async def test_a_silent_server_times_out_a_client_command(fake: FakeRedis) -> None:
    fake.rules[b"k"] = None  # GET k is never answered
    url = fake.url()
    client = connect_redis(url, connect_timeout=2, client_name="t", socket_timeout=0.3)
    try:
        with pytest.raises(BrokerConnectionError), redis_errors_as(url):
            await client.get("k")
    finally:
        await client.aclose()


async def test_an_unparsable_redis_url_is_a_configuration_error() -> None:
    from aioqueue import ConfigurationError

    with pytest.raises(ConfigurationError) as caught:
        connect_redis("redis://:pw@host/0?db=notanumber", connect_timeout=1, client_name="t")
    assert "pw" not in str(caught.value)


# -- eviction policy --------------------------------------------------------------------------


async def test_no_eviction_warning_on_the_shared_noeviction_redis(redis_url: str) -> None:
    async with batcher_for(redis_url) as batcher:
        assert await eviction_warning(batcher) is None
        assert await eviction_warning(batcher._client) is None


async def test_eviction_warning_names_a_policy_that_evicts_queues(
    private_redis: Callable[..., PrivateRedis],
) -> None:
    server = private_redis("--maxmemory-policy", "allkeys-lru")
    await server.ready()
    async with batcher_for(server.url) as batcher:
        warning = await eviction_warning(batcher)
        assert warning is not None and "allkeys-lru" in warning and "\n" not in warning
        assert await eviction_warning(batcher._client) == warning
        for policy, warns in [
            ("allkeys-random", True),
            ("allkeys-lfu", True),
            ("volatile-lru", False),
            ("volatile-ttl", False),
            ("noeviction", False),
        ]:
            await batcher._client.config_set("maxmemory-policy", policy)
            assert (await eviction_warning(batcher) is not None) is warns, policy


async def test_a_redis_broker_warns_at_connect_when_its_server_may_evict_queues(
    private_redis: Callable[..., PrivateRedis], caplog: pytest.LogCaptureFixture
) -> None:
    from aioqueue import App

    server = private_redis("--maxmemory-policy", "allkeys-lru")
    await server.ready()
    caplog.set_level(logging.WARNING, "aioqueue.broker.redis")
    app = App("evictable", broker=server.url)
    async with app:
        pass
    warnings = [r.getMessage() for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    assert len(warnings) == 1 and "allkeys-lru" in warnings[0]


async def test_a_store_refused_for_memory_leaves_its_message_unacked(
    private_redis: Callable[..., PrivateRedis],
) -> None:
    """Item 13: store and ack go out as one transaction; Redis out of memory refuses the store
    as it is queued, EXEC aborts, and the message stays in the worker's processing list."""
    from aioqueue import App, ResultBackendError

    server = private_redis("--maxmemory-policy", "noeviction")
    await server.ready()
    app = App("oom", broker=server.url, backend=server.url)

    @app.task
    async def job() -> int:
        return 1

    async with app:
        result = await job.send()
        consumer = app.broker.consumer(["default"], worker_id="oom")
        await consumer.start()
        try:
            (delivery,) = await consumer.fetch(1, 0)
            raw = redis.asyncio.Redis.from_url(server.url)
            try:
                await raw.config_set("maxmemory", 1)  # this private server is now full
                outcome = b'{"v":1,"id":"' + result.id.encode() + b'","state":"SUCCESS"}'
                backend = app.backend
                with pytest.raises((BrokerError, ResultBackendError), match=r"OOM|EXECABORT"):
                    await backend.store_and_ack(  # type: ignore[attr-defined]
                        delivery, result.id, outcome, ttl=60, reply_to=None
                    )
                assert await raw.lrange("aioqueue:{default}:processing:oom", 0, -1) == [
                    delivery.body
                ]
                assert not await raw.exists(f"aioqueue:result:{result.id}")
                with pytest.raises(ResultBackendError, match="out of range"):
                    await backend.store_and_ack(  # type: ignore[attr-defined]
                        delivery, result.id, outcome, ttl=1e300, reply_to=None
                    )
                await raw.config_set("maxmemory", 0)
                assert await backend.store_and_ack(  # type: ignore[attr-defined]
                    delivery, result.id, outcome, ttl=60, reply_to=None
                )
                assert await raw.llen("aioqueue:{default}:processing:oom") == 0
            finally:
                await raw.aclose()
        finally:
            await consumer.close()


async def test_no_eviction_warning_when_config_is_disabled(
    private_redis: Callable[..., PrivateRedis],
) -> None:
    server = private_redis("--maxmemory-policy", "allkeys-lru", "--rename-command", "CONFIG", "")
    await server.ready()
    async with batcher_for(server.url) as batcher:
        assert await eviction_warning(batcher) is None
        assert await eviction_warning(batcher._client) is None


async def test_eviction_warning_raises_when_redis_is_unreachable() -> None:
    url = f"redis://127.0.0.1:{_free_port()}/0"
    async with batcher_for(url) as batcher:
        with pytest.raises(BrokerConnectionError):
            await eviction_warning(batcher)
        with pytest.raises(BrokerConnectionError):
            await eviction_warning(batcher._client)


async def test_an_idle_result_listener_outlives_the_socket_timeout(
    redis_url: str,
    key_prefix: str,
    redis_cleanup: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Pub/sub reads wait for pushes without end; the socket timeout must not cut them.

    redis-py before 8.0 bounds a blocking pub/sub read by ``socket_timeout``: an idle listener
    there drops and resubscribes every ``socket_timeout`` seconds, and pushes sent meanwhile
    are lost. This is what sets the lowest redis-py version in pyproject.toml.
    """
    from aioqueue import _redis
    from aioqueue.backends.redis import RedisBackend

    monkeypatch.setattr(_redis, "SOCKET_TIMEOUT", 0.2)
    caplog.set_level(logging.WARNING, logger="aioqueue")
    backend = RedisBackend(redis_url, key_prefix=key_prefix, connect_timeout=2)
    try:
        await backend.start_listening()
        # Quiet for five socket timeouts: the absence of an event has nothing else to wait on.
        await asyncio.sleep(1.0)
        assert not caplog.records, [r.getMessage() for r in caplog.records]
        await backend.store("t1", b"outcome", ttl=60, reply_to=backend.reply_to())
        assert await backend.wait("t1", timeout=5) == b"outcome"
    finally:
        await backend.aclose()


async def test_an_unreachable_redis_fails_client_calls_at_once_every_time() -> None:
    """A failed connect gives its pool slot back (redis-py 5.0's blocking pool deadlocked)."""
    url = f"redis://127.0.0.1:{_free_port()}/0"
    client = connect_redis(
        url, connect_timeout=1, client_name="t", max_connections=1, pool_timeout=3
    )
    loop = asyncio.get_running_loop()
    try:
        for _ in range(3):
            started = loop.time()
            with pytest.raises(BrokerConnectionError) as caught, redis_errors_as(url):
                await client.ping()
            assert loop.time() - started < 2.0
            assert "No connection available" not in str(caught.value)
    finally:
        await client.aclose()
