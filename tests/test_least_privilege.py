"""Least privilege (issue 14, item 3): aioqueue works with accounts limited to its own names.

Redis: an ACL user made with :func:`aioqueue.acl.redis_acl` on a PRIVATE redis-server. RabbitMQ:
a user and vhost of this test's own on the shared node, with the regexes of
:func:`aioqueue.acl.rabbitmq_permissions`, deleted afterwards (guest and "/" are not touched).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from conftest import (
    AMQP_URL,
    IN_CI,
    REDIS_URL,
    PrivateRedis,
    port_open,
    require_server,
    wait_until,
)
from redis import asyncio as aioredis
from redis.exceptions import NoPermissionError

from aioqueue import AioQueueError, App
from aioqueue.acl import rabbitmq_permissions, redis_acl
from aioqueue.message import Message

KEY = "least-privilege-signing-key-0123"


async def _exercise(app: App) -> None:
    """What a deployment does: sends (plain, delayed, prioritised, unique), a retry, a revoke,
    watched states, a dead letter, and a worker's heartbeat, fetch, store and ack."""
    calls = {"flaky": 0}

    @app.task(track_started=True)
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task(retry_for=ValueError, max_retries=1, default_retry_delay=0.05)
    async def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ValueError("first time")
        return "second time"

    async with app, app.worker(concurrency=4, processes=1) as worker:
        assert await (await add.send(1, 2)).get(timeout=10) == 3
        # remote control: a request and its reply queue (RabbitMQ) live under the prefix too
        assert await app.control.ping(worker.id, timeout=10) == {worker.id: "pong"}
        async with app.events() as feed:  # the events reader, and the worker emitting them
            await add.send(5, 5)
            async for event in feed:
                if event.type == "task-succeeded":
                    break
        assert await (await add.options(countdown=0.2).send(2, 2)).get(timeout=10) == 4
        unique = await add.options(unique_for=30).send(3, 3)
        assert await unique.get(timeout=10) == 6
        watched = [u.state async for u in (await add.send(4, 4)).watch()]
        assert watched[-1] == "SUCCESS"
        assert await (await flaky.send()).get(timeout=10) == "second time"
        later = await add.options(countdown=30).send(0, 0)
        await later.revoke()
        with pytest.raises(Exception, match="revoked"):
            await later.get(timeout=10)
        await app.broker.publish("default", app.codec.encode(_message()))

        async def dead_lettered() -> bool:
            return len(await app.broker.dead_letters("default")) == 1

        await wait_until(dead_lettered)


def _message() -> Message:
    return Message(id="lp-unknown", task="not.registered", queue="default")


# -- Redis ---------------------------------------------------------------------------------------


@pytest.fixture
def acl_redis(private_redis: PrivateRedis) -> PrivateRedis:
    return private_redis


async def test_redis_acl_user_limited_to_the_prefix_runs_everything(
    acl_redis: PrivateRedis,
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not await port_open(acl_redis.port):
        assert loop.time() < deadline, "the private redis-server did not start"
        await asyncio.sleep(0.02)
    admin = aioredis.Redis(port=acl_redis.port)
    prefix = "lp"
    await admin.execute_command(*redis_acl("aq", prefix, "s3cret-pw").split())
    await admin.execute_command("ACL", "LOG", "RESET")
    url = f"redis://aq:s3cret-pw@127.0.0.1:{acl_redis.port}/0"
    try:
        for settings in ({}, {"signing_key": KEY}):
            app = App("lp", broker=url, backend=url, key_prefix=prefix, events=True, **settings)
            await _exercise(app)
            await app.close()
            await admin.delete(*[k async for k in admin.scan_iter(match=f"{prefix}:*")])
        denied = await admin.acl_log()
        objects = {str(entry["object"]) for entry in denied}
        assert objects <= {"config|get"}, denied  # only the optional eviction check
        # and the account really is limited
        limited = aioredis.Redis.from_url(url)
        with pytest.raises(NoPermissionError):
            await limited.set("elsewhere:key", b"x")
        with pytest.raises(NoPermissionError):
            await limited.publish("elsewhere:channel", b"x")
        with pytest.raises(NoPermissionError):
            await limited.flushdb()
        await limited.aclose()
    finally:
        await admin.aclose()


def test_the_documented_acl_line_is_what_the_code_gives() -> None:
    line = redis_acl("aioqueue", "aioqueue")
    assert line.startswith(
        "ACL SETUSER aioqueue on ><password> resetkeys ~aioqueue:* resetchannels &aioqueue:* -@all"
    )
    readme = (__import__("pathlib").Path(__file__).parent.parent / "README.md").read_text()
    assert line in readme


# -- RabbitMQ ------------------------------------------------------------------------------------


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def rabbit_account(key_prefix: str) -> Iterator[tuple[str, str]]:
    """A user and vhost of this test's own (never guest, never "/"), deleted afterwards."""
    require_server(AMQP_URL, "RabbitMQ")
    if shutil.which("rabbitmqctl") is None:
        if IN_CI:
            pytest.fail("rabbitmqctl is needed for the least-privilege test")
        pytest.skip("rabbitmqctl not installed")
    name = f"aqtest-lp-{uuid.uuid4().hex[:8]}"
    prefix = key_prefix
    _rabbitmqctl("add_vhost", name)
    _rabbitmqctl("add_user", name, "lp-password")
    try:
        _rabbitmqctl("set_permissions", "-p", name, name, *rabbitmq_permissions(prefix))
        yield name, prefix
    finally:
        subprocess.run(["rabbitmqctl", "delete_user", name], capture_output=True, timeout=60)
        subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, timeout=60)


@pytest.mark.parametrize("backend", ["rpc://", "redis"])
async def test_rabbitmq_user_limited_to_its_vhost_and_prefix_runs_everything(
    rabbit_account: tuple[str, str], backend: str
) -> None:
    vhost, prefix = rabbit_account
    host = AMQP_URL.split("@")[-1].split("/")[0]
    url = f"amqp://{vhost}:lp-password@{host}/{vhost}"
    results = REDIS_URL if backend == "redis" else backend
    app = App("lp", broker=url, backend=results, key_prefix=prefix, events=True)
    try:
        await _exercise(app)
    finally:
        await app.close()
        if backend == "redis":
            client = aioredis.Redis.from_url(REDIS_URL)
            keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()
    # outside the prefix: refused
    other = App("lp", broker=url, backend="rpc://", key_prefix="notmine")
    try:
        with pytest.raises(AioQueueError, match="ACCESS_REFUSED"):
            async with other:
                await other.broker.queue_length("default")
    finally:
        await other.close()
