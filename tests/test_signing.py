"""Message signing: only holders of the key make a worker do anything (issue 14, item 1)."""

from __future__ import annotations

import hashlib
import hmac
import re
import time

import orjson
import pytest
from conftest import REDIS_URL, AppFactory, running_worker, wait_until
from redis import asyncio as aioredis
from test_limits import _has

from aioqueue import App, BadSignature, ConfigurationError, ProtocolError, SerializationError
from aioqueue.message import Message, MessageCodec
from aioqueue.signing import Signer, signer_from

KEY = "a-signing-key-for-tests-0123456789"
OLD_KEY = "the-previous-signing-key-9876543210"


# -- the signer ---------------------------------------------------------------------------------


def test_sign_then_verify_gives_back_the_exact_body() -> None:
    signer = Signer([KEY.encode()])
    body = b'{"v":1,"id":"x"}'
    signed = signer.sign(body)
    mac = hmac.new(KEY.encode(), body, hashlib.sha256).hexdigest().encode()
    assert signed == body + b"\n" + mac
    assert bytes(signer.verify(signed)) == body


@pytest.mark.parametrize(
    "forge",
    [
        lambda s: s[:-65],  # unsigned
        lambda s: s.replace(b'"x"', b'"y"'),  # body changed
        lambda s: s[:-1] + (b"0" if s[-1:] != b"0" else b"1"),  # MAC changed
        lambda s: b"",
        lambda s: s[:-65] + b"\n" + b"z" * 64,  # not hex
    ],
)
def test_anything_but_the_signed_bytes_is_refused(forge: object) -> None:
    signer = Signer([KEY.encode()])
    signed = signer.sign(b'{"v":1,"id":"x"}')
    with pytest.raises(BadSignature, match="bad signature"):
        signer.verify(forge(signed))  # type: ignore[operator]


def test_rotation_signs_with_the_first_key_and_accepts_all() -> None:
    old = signer_from(OLD_KEY)
    rotated = signer_from([KEY, OLD_KEY])
    assert old is not None and rotated is not None
    from_old = old.sign(b"{}")
    assert bytes(rotated.verify(from_old)) == b"{}"
    from_new = rotated.sign(b"{}")
    with pytest.raises(BadSignature):
        old.verify(from_new)  # the new key signs


def test_the_redis_attempt_mark_keeps_the_signature_valid() -> None:
    signer = Signer([KEY.encode()])
    signed = signer.sign(b'{"priority":3,"v":1,"id":"x"}')
    marked = b'{"attempt":2,' + signed[1:]  # what the Redis broker's scripts write
    assert bytes(signer.verify(marked)) == b'{"attempt":2,"priority":3,"v":1,"id":"x"}'
    tampered = b'{"attempt":2,' + signed[1:].replace(b'"x"', b'"y"')
    with pytest.raises(BadSignature):
        signer.verify(tampered)


@pytest.mark.parametrize("bad", ["short", [b""], 42, ["fine-and-long-enough-key", 7]])
def test_a_weak_or_malformed_key_is_a_configuration_error(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="signing_key"):
        App("weak", signing_key=bad)


def test_the_key_never_shows_in_reprs_or_config_dumps(monkeypatch: pytest.MonkeyPatch) -> None:
    app = App("masked", signing_key=[KEY, OLD_KEY])
    for text in (repr(app.conf), app.conf.humanize(), str(app.conf.table()), repr(app.codec)):
        assert KEY not in text and OLD_KEY not in text
    assert KEY not in repr(app.codec.signer)
    monkeypatch.setenv("AIOQUEUE_SIGNING_KEY", f"{KEY},{OLD_KEY}")
    from_env = App("env")
    assert from_env.codec.signer is not None
    assert bytes(from_env.codec.signer.verify(signer_from(OLD_KEY).sign(b"{}"))) == b"{}"  # type: ignore[union-attr]


def test_pickle_is_refused_unless_signing_is_on() -> None:
    with pytest.raises(ConfigurationError, match=r"pickle.*signing_key"):
        App("p", accept_content=["json", "pickle"])
    App("p", accept_content=["json", "pickle"], signing_key=KEY)  # fine with a key


def test_an_app_without_the_key_says_so_for_a_signed_message() -> None:
    signed = MessageCodec(signer=signer_from(KEY)).encode(Message(id="i", task="t", queue="q"))
    with pytest.raises(ProtocolError, match="signed but this app has no signing_key"):
        MessageCodec().decode(signed)
    with pytest.raises(SerializationError, match="not valid JSON"):
        MessageCodec().decode(b"{nope")


def test_codec_signs_messages_and_outcomes_and_refuses_unsigned() -> None:
    signed = MessageCodec(signer=signer_from(KEY))
    plain = MessageCodec()
    message = Message(id="i", task="t", queue="q", args=(1,))
    body = signed.encode(message)
    assert signed.decode(body).args == (1,)
    with pytest.raises(BadSignature):
        signed.decode(plain.encode(message))
    with pytest.raises(BadSignature):
        signed.decode_outcome(b'{"v":1,"id":"i","state":"SUCCESS","result":1}')


# -- on every transport -------------------------------------------------------------------------


async def test_signed_apps_run_tasks_and_store_signed_results(make_app: AppFactory) -> None:
    app = make_app(signing_key=[KEY, OLD_KEY])

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    async with app, running_worker(app):
        result = await add.send(2, 3)
        assert await result.get(timeout=10) == 5
        if app.conf.result_backend == REDIS_URL:
            raw = await app.backend.get(result.id)
            assert raw is not None and re.search(rb"\n[0-9a-f]{64}$", raw)


async def test_limits_changed_at_run_time_reach_signed_workers(make_app: AppFactory) -> None:
    """Limit commands are signed like revocations: a signed worker applies them when pushed,
    and one started later loads the kept ones (a regression: Redis kept and pushed them bare,
    so signed workers dropped them as forged)."""
    app = make_app(signing_key=KEY)

    @app.task
    async def job() -> None: ...

    async with app, running_worker(app) as worker:
        await app.control.rate_limit(job.name, "5/s")
        await wait_until(lambda: _has(worker, job.name, rate="5/s"), timeout=10)
        await app.control.concurrency_limit(job.name, 2)
        async with running_worker(app) as later:
            await wait_until(lambda: _has(later, job.name, cap=2, rate="5/s"), timeout=10)


async def test_signed_workers_answer_inspect_requests(make_app: AppFactory) -> None:
    """Requests are signed like every control command (a signed worker drops unsigned ones)."""
    app = make_app(signing_key=KEY)

    @app.task
    async def job() -> None: ...

    async with app, running_worker(app) as worker:
        replies = await app.control.ping(worker.id, timeout=5)
        assert replies == {worker.id: "pong"}, replies


async def test_a_forged_kept_limit_is_ignored(redis_url: str, key_prefix: str) -> None:
    app = App("c", broker=redis_url, backend=redis_url, key_prefix=key_prefix, signing_key=KEY)

    @app.task
    async def job() -> None: ...

    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.hset(f"{key_prefix}:limits", f"cap:{job.name}", b"1")
        async with app:
            await app.control.rate_limit(job.name, "5/s")  # signed: kept and loaded
            async with running_worker(app) as worker:
                await wait_until(lambda: _has(worker, job.name, rate="5/s"), timeout=10)
                assert worker._limits.active[job.name].cap is None  # the forged cap is not
    finally:
        await app.close()
        keys = [k async for k in client.scan_iter(match=f"{key_prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_forged_messages_are_dead_lettered_unread_and_never_run(
    make_app: AppFactory,
) -> None:
    """An unsigned sender (anyone who can write to the broker) and one with the wrong key."""
    worker_app = make_app("signed", signing_key=KEY)
    ran: list[str] = []

    @worker_app.task(name="pay")
    async def pay(to: str) -> str:
        ran.append(to)
        return to

    forgers = [MessageCodec(), MessageCodec(signer=signer_from(OLD_KEY))]
    async with worker_app, running_worker(worker_app):
        forged = [f"forged-{n}" for n in range(len(forgers))]
        for task_id, codec in zip(forged, forgers, strict=True):
            message = Message(id=task_id, task="pay", queue="default", args=("mallory",))
            await worker_app.broker.publish("default", codec.encode(message))

        async def dead_lettered() -> bool:
            return len(await worker_app.broker.dead_letters("default")) == 2

        await wait_until(dead_lettered)
        # the worker goes on: a signed task still runs
        good = await worker_app.tasks["pay"].send("alice")
        assert await good.get(timeout=10) == "alice"
        assert ran == ["alice"]
        for dead in await worker_app.broker.dead_letters("default"):
            assert "bad signature" in dead.reason
            assert dead.body == b""  # not kept: the bytes are the forger's
            assert dead.size is not None and dead.size > 0
        for task_id in forged:  # nothing recorded under an id the forger chose
            assert await worker_app.backend.get(task_id) is None


async def test_a_forged_result_is_refused_by_the_client(redis_url: str, key_prefix: str) -> None:
    app = App("r", broker=redis_url, backend=redis_url, key_prefix=key_prefix, signing_key=KEY)

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    client = aioredis.Redis.from_url(redis_url)
    try:
        async with app:
            result = await add.options(task_id=f"{key_prefix}-forged").send(1, 2)
            forged = orjson.dumps(
                {
                    "v": 1,
                    "id": result.id,
                    "state": "SUCCESS",
                    "date_done": time.time(),
                    "result": 99,
                }
            )
            await client.set(f"{key_prefix}:result:{result.id}", forged, px=60_000)
            with pytest.raises(BadSignature):
                await result.state()  # reads the stored record
    finally:
        await app.close()
        keys = [k async for k in client.scan_iter(match=f"{key_prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_forged_control_commands_are_ignored(redis_url: str, key_prefix: str) -> None:
    """A revocation kept or pushed without a MAC does not stop a task; a signed one does."""
    app = App("c", broker=redis_url, backend=redis_url, key_prefix=key_prefix, signing_key=KEY)

    @app.task
    async def echo(x: int) -> int:
        return x

    client = aioredis.Redis.from_url(redis_url)
    victim, pushed = f"{key_prefix}-victim", f"{key_prefix}-pushed"
    try:
        # kept before the worker starts: the worker loads the set when it starts listening
        await client.zadd(f"{key_prefix}:revoked", {f"r:{victim}": time.time() + 60})
        async with app, running_worker(app):
            await client.publish(
                f"{key_prefix}:control",
                orjson.dumps({"verb": "revoke", "ids": [pushed], "terminate": 1, "expires": 1e10}),
            )
            # a signed revoke pushed after the forged one: once the worker has applied it, it
            # has read the forged one too (one subscription delivers in order)
            later = await echo.options(countdown=1).send(0)
            await later.revoke()
            with pytest.raises(Exception, match="revoked"):
                await later.get(timeout=10)
            for task_id in (victim, pushed):
                assert await (await echo.options(task_id=task_id).send(7)).get(timeout=10) == 7
        members = await client.zrange(f"{key_prefix}:revoked", 0, -1)
        assert any(m.startswith(b"r:" + later.id.encode() + b"\n") for m in members)
    finally:
        await app.close()
        keys = [k async for k in client.scan_iter(match=f"{key_prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_a_redelivered_signed_message_still_verifies(redis_url: str, key_prefix: str) -> None:
    """The Redis broker marks a message it takes back with its attempt; the MAC still holds."""
    app = App("a", broker=redis_url, backend=redis_url, key_prefix=key_prefix, signing_key=KEY)

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    client = aioredis.Redis.from_url(redis_url)
    try:
        async with app:
            result = await add.send(1, 2)
            consumer = app.broker.consumer(["default"], worker_id="taker")
            [delivery] = await consumer.fetch(1, 5)
            await delivery.requeue(count_attempt=True)
            await consumer.close()
            [body] = await client.lrange(f"{key_prefix}:{{default}}", 0, -1)
            assert body.startswith(b'{"attempt":2,')
            async with running_worker(app):
                assert await result.get(timeout=10) == 3
    finally:
        await app.close()
        keys = [k async for k in client.scan_iter(match=f"{key_prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_forged_commands_on_the_rabbitmq_control_stream_are_ignored(
    amqp_url: str, key_prefix: str
) -> None:
    """AMQP broker with rpc:// results: the control bus is a stream; an unsigned revoke in it
    does not stop a task, a signed one (the API's) does."""
    import aio_pika

    app = App(
        "s",
        broker=amqp_url,
        backend="rpc://",
        key_prefix=key_prefix,
        signing_key=KEY,
        amqp_delete_queues_on_close=True,
    )

    @app.task
    async def echo(x: int) -> int:
        return x

    connection = await aio_pika.connect(amqp_url)
    try:
        async with app, running_worker(app):
            victim = f"{key_prefix}-victim"
            channel = await connection.channel()
            forged = {"verb": "revoke", "ids": [victim], "terminate": True, "expires": 1e10}
            await channel.default_exchange.publish(
                aio_pika.Message(orjson.dumps(forged)), routing_key=f"{key_prefix}.control"
            )
            # a signed revoke published after the forged one: once the worker has applied it,
            # it has read the forged one too (a stream is read in order)
            later = await echo.options(countdown=1).send(8)
            await later.revoke()
            with pytest.raises(Exception, match="revoked"):
                await later.get(timeout=10)
            result = await echo.options(task_id=victim).send(7)
            assert await result.get(timeout=10) == 7
    finally:
        await app.close()
        await connection.close()
