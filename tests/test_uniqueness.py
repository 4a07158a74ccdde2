"""Uniqueness and result options (issue 8, items 8 and 9): task_id=, unique_for, ignore_result,
per-send result_ttl; on every transport (see conftest.TRANSPORTS)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from conftest import AppFactory, running_worker, wait_until

from aioqueue import (
    App,
    BrokerError,
    ConfigurationError,
    Message,
    ProtocolError,
    ResultIgnored,
    States,
)
from aioqueue.message import MessageCodec
from aioqueue.uniqueness import unique_id
from aioqueue.worker.settle import Store

pytestmark = pytest.mark.timeout(60)

RESULT_TTL = 30.0  # claims on rpc:// are queues that live this long: keep them short in tests


def counting_app(make_app: AppFactory, **config: Any) -> tuple[App, Any, list[Any]]:
    app = make_app(result_ttl=RESULT_TTL, **config)
    runs: list[Any] = []

    @app.task
    async def add(x: int, y: int) -> int:
        runs.append((x, y))
        return x + y

    return app, add, runs


async def queued(app: App) -> int:
    return await (await app.ready_broker()).queue_length("default")


# -- task_id= -------------------------------------------------------------------------------


async def test_second_send_of_an_id_enqueues_nothing_and_returns_the_first(
    make_app: AppFactory,
) -> None:
    app, add, runs = counting_app(make_app)
    async with app:
        first = await add.options(task_id="dup-1").send(1, 1)
        waiting = await add.options(task_id="dup-1").send(5, 5)  # first still waiting
        assert first.id == waiting.id == "dup-1"
        assert await queued(app) == 1
        async with running_worker(app):
            assert await first.get(timeout=10) == 2
            assert await waiting.get(timeout=10) == 2
            # done, and its result still kept: still nothing enqueued
            after = await add.options(task_id="dup-1").send(7, 7)
            assert await after.get(timeout=10) == 2
            assert await app.AsyncResult("dup-1").get(timeout=10) == 2
        assert await queued(app) == 0
    assert runs == [(1, 1)]


async def test_many_concurrent_sends_of_one_id_enqueue_exactly_one(make_app: AppFactory) -> None:
    app, add, runs = counting_app(make_app)
    async with app:
        handles = await asyncio.gather(*(add.options(task_id="race").send(i, 0) for i in range(40)))
        assert {h.id for h in handles} == {"race"}
        assert await queued(app) == 1
        async with running_worker(app):
            values = await asyncio.gather(*(h.get(timeout=15) for h in handles))
    assert len(runs) == 1
    assert values == [runs[0][0]] * 40


async def test_send_many_sends_an_id_once_within_a_batch_and_across_sends(
    make_app: AppFactory,
) -> None:
    app, add, runs = counting_app(make_app)
    async with app:
        earlier = await add.options(task_id="b-0").send(100, 0)
        handles = await add.send_many(
            [
                add.s(1, 0).set(task_id="b-1"),
                add.s(2, 0).set(task_id="b-1"),  # same id in the batch: the first one's handle
                add.s(3, 0).set(task_id="b-0"),  # sent before: the earlier handle
                (4, 0),  # no id: a plain message
                add.s(5, 0).set(task_id="b-2"),
            ]
        )
        assert [h.id for h in handles[:3]] == ["b-1", "b-1", "b-0"]
        assert handles[4].id == "b-2"
        assert await queued(app) == 4  # b-0, b-1, the plain one, b-2
        async with running_worker(app):
            values = await asyncio.gather(*(h.get(timeout=15) for h in handles))
            assert await earlier.get(timeout=10) == 100
    assert values == [1, 1, 100, 4, 5]
    assert sorted(runs) == [(1, 0), (4, 0), (5, 0), (100, 0)]


async def test_send_task_and_batch_options_claim_too(make_app: AppFactory) -> None:
    app, add, runs = counting_app(make_app)
    async with app:
        by_name = await app.send_task(add.name, [1, 2], task_id="n-1")
        again = await app.send_task(add.name, [3, 4], task_id="n-1")
        batch = await add.options(task_id="n-1").send_many([(5, 6)])
        assert by_name.id == again.id == batch[0].id == "n-1"
        assert await queued(app) == 1
        async with running_worker(app):
            assert await again.get(timeout=10) == 3
    assert runs == [(1, 2)]


async def test_a_failed_publish_gives_the_id_back(make_app: AppFactory) -> None:
    app, add, _runs = counting_app(make_app)
    async with app:
        broker = await app.ready_broker()
        real = broker.publish

        async def refuse(*args: Any, **kwargs: Any) -> None:
            raise BrokerError("refused for the test")

        broker.publish = refuse  # type: ignore[method-assign]
        with pytest.raises(BrokerError):
            await add.options(task_id="retry-me").send(1, 1)
        broker.publish = real  # type: ignore[method-assign]
        result = await add.options(task_id="retry-me").send(2, 2)
        assert await queued(app) == 1
        async with running_worker(app):
            assert await result.get(timeout=10) == 4


async def test_apply_runs_whatever_the_id(make_app: AppFactory) -> None:
    """Eager: no broker and no claim; the id (explicit or derived) only names the result."""
    app, add, runs = counting_app(make_app)
    async with app:
        await add.options(task_id="eager").send(1, 1)
        applied = await add.options(task_id="eager").apply(2, 2)
        assert applied.id == "eager" and await applied.get() == 4
    assert runs == [(2, 2)]


# -- unique_for -----------------------------------------------------------------------------


async def test_unique_for_dedupes_by_arguments_while_waiting_and_within_the_window(
    make_app: AppFactory,
) -> None:
    app = make_app(result_ttl=RESULT_TTL)
    runs: list[int] = []

    @app.task(unique_for=0.3)
    async def report(day: int, *, full: bool = False) -> int:
        runs.append(day)
        return len(runs)

    async with app:
        sent_at = time.time()
        first = await report.send(1)
        assert (await report.send(1)).id == first.id
        other = await report.send(2)
        kw = await report.send(1, full=True)
        assert len({first.id, other.id, kw.id}) == 3
        await asyncio.sleep(max(0.0, sent_at + 0.5 - time.time()))  # past the window...
        waiting = await report.send(1)  # ...but the first still waits: still one
        assert waiting.id == first.id
        assert await queued(app) == 3
        async with running_worker(app, concurrency=1):
            assert await first.get(timeout=10) == await waiting.get(timeout=10)
            await other.get(timeout=10)
            await kw.get(timeout=10)
            # finished, window over: the same call runs again, and its new result is read
            again = await report.send(1)
            assert again.id == first.id
            assert await again.get(timeout=10) == 4
    assert sorted(runs) == [1, 1, 1, 2]


async def test_unique_for_within_the_window_after_it_finished(make_app: AppFactory) -> None:
    app = make_app(result_ttl=RESULT_TTL)
    runs: list[str] = []

    @app.task(unique_for=30)
    async def build(name: str) -> str:
        runs.append(name)
        return name.upper()

    async with app, running_worker(app):
        first = await build.send("a")
        assert await first.get(timeout=10) == "A"
        second = await build.send("a")
        assert second.id == first.id
        assert await second.get(timeout=10) == "A"
        many = await build.send_many([("a",), ("b",), ("b",)])
        assert [h.id for h in many[:1]] == [first.id] and many[1].id == many[2].id
        assert await many[2].get(timeout=10) == "B"
    assert runs == ["a", "b"]


def test_unique_id_is_stable_and_spelling_matters() -> None:
    assert unique_id("t", (1, 2), {}) == unique_id("t", (1, 2), {})
    assert unique_id("t", (), {"a": 1, "b": 2}) == unique_id("t", (), {"b": 2, "a": 1})
    assert unique_id("t", (1, 2), {}) != unique_id("t", (), {"x": 1, "y": 2})
    assert unique_id("t", (1,), {}) != unique_id("u", (1,), {})
    assert unique_id("t", ({"b", "a", "c"},), {}) == unique_id("t", (["a", "b", "c"],), {})


# -- ignore_result --------------------------------------------------------------------------


async def test_ignore_result_stores_and_pushes_nothing(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(result_ttl=RESULT_TTL)
    ran = asyncio.Event()

    @app.task(ignore_result=True)
    async def fire(x: int) -> int:
        ran.set()
        if x < 0:
            raise ValueError("negative")
        return x

    async with app:
        async with running_worker(app):
            sent = await fire.send(1)
            with pytest.raises(ResultIgnored, match="ignore_result"):
                await sent.get(timeout=10)
            await asyncio.wait_for(ran.wait(), 10)
            with caplog.at_level(logging.ERROR, logger="aioqueue.worker"):
                failing = await fire.send(-1)
                bad = await app.send_task(fire.name, ["a", "b"])  # does not bind: bad input

                async def logged() -> bool:
                    return "negative" in caplog.text and "InvalidArguments" in caplog.text

                await wait_until(logged)
            kept = await fire.options(ignore_result=False).send(2)
            assert await kept.get(timeout=10) == 2
        # the worker has settled everything: nothing was stored for the ignored ones
        for handle in (sent, failing, bad):
            assert await app.AsyncResult(handle.id).state() == States.PENDING
        dead = await (await app.ready_broker()).dead_letters("default")
        assert len(dead) == 1 and "arguments do not fit" in dead[0].reason


async def test_ignore_result_per_send_and_on_apply(make_app: AppFactory) -> None:
    app, add, runs = counting_app(make_app)
    async with app, running_worker(app):
        ignored = await add.options(ignore_result=True).send(1, 1)
        with pytest.raises(ResultIgnored):
            await ignored.get(timeout=10)
        batch = await add.options(ignore_result=True).send_many([(2, 2)])
        with pytest.raises(ResultIgnored):
            await batch[0].get()
        by_name = await app.send_task(add.name, [3, 3], ignore_result=True)
        with pytest.raises(ResultIgnored):
            await by_name.get()
        applied = await add.options(ignore_result=True).apply(4, 4)
        with pytest.raises(ResultIgnored):
            await applied.get()
        assert await applied.state() == States.SUCCESS  # it ran here; get() keeps the contract

        async def all_ran() -> bool:
            return len(runs) == 4

        await wait_until(all_ran)


async def test_ignore_result_with_an_id_frees_the_id_when_done(make_app: AppFactory) -> None:
    app, add, runs = counting_app(make_app)
    async with app:
        async with running_worker(app):
            await add.options(task_id="fire-once", ignore_result=True).send(1, 1)

            async def ran() -> bool:
                return len(runs) == 1

            await wait_until(ran)
        # settled: no result is kept to hold the id, so the id is free again
        again = await add.options(task_id="fire-once").send(2, 2)
        assert await queued(app) == 1
        async with running_worker(app):
            assert await again.get(timeout=10) == 4


# -- result TTL -----------------------------------------------------------------------------


async def test_per_send_result_ttl_expires(make_app: AppFactory) -> None:
    app, add, _runs = counting_app(make_app)
    async with app, running_worker(app):
        short = await add.options(result_ttl=0.3).send(1, 1)
        long = await add.send(2, 2)
        assert await short.get(timeout=10) == 2
        assert await long.get(timeout=10) == 4

        async def expired() -> bool:
            return (
                await app.AsyncResult(short.id).state() == States.PENDING
                and await short.state() == States.PENDING
            )

        await wait_until(expired, timeout=5)
        assert await long.state() == States.SUCCESS


async def test_an_id_is_free_again_once_its_result_expired(make_app: AppFactory) -> None:
    app, add, runs = counting_app(make_app)
    async with app, running_worker(app):
        first = await add.options(task_id="short-lived", result_ttl=0.3).send(1, 1)
        assert await first.get(timeout=10) == 2

        async def expired() -> bool:
            return await first.state() == States.PENDING

        await wait_until(expired, timeout=5)
        await asyncio.sleep(0.05)  # the claim ends with the result, measured from the same store
        second = await add.options(task_id="short-lived", result_ttl=0.3).send(2, 2)
        assert await second.get(timeout=10) == 4
    assert runs == [(1, 1), (2, 2)]


# -- checks before any I/O, and the envelope ----------------------------------------------


BAD = [
    ({"ignore_result": "yes"}, "'yes'"),
    ({"ignore_result": 1}, "1"),
    ({"unique_for": 0}, "0"),
    ({"unique_for": -1}, "-1"),
    ({"unique_for": math.nan}, "nan"),
    ({"unique_for": math.inf}, "inf"),
    ({"unique_for": True}, "True"),
    ({"unique_for": "60"}, "'60'"),
    ({"task_id": ""}, "''"),
]


@pytest.mark.parametrize(("options", "named"), BAD)
async def test_bad_values_raise_before_any_io(options: dict[str, Any], named: str) -> None:
    app = App("closed", broker="redis://127.0.0.1:1/0")

    @app.task
    async def job(x: int) -> int:
        return x

    for call in (
        lambda: job.options(**options),
        lambda: job.s(1).set(**options),
    ):
        with pytest.raises(ConfigurationError) as caught:
            call()
        assert named in str(caught.value)
    with pytest.raises(ConfigurationError, match="send option"):
        await app.send_task(job.name, [1], **options)


@pytest.mark.parametrize("value", [0, -5, math.nan, math.inf, True, "10"])
def test_bad_unique_for_on_the_task(value: Any) -> None:
    app = App("t", broker="memory://")
    with pytest.raises(ConfigurationError, match="unique_for") as caught:
        app.task(unique_for=value)(lambda: None)
    assert repr(value) in str(caught.value)
    with pytest.raises(ConfigurationError, match="ignore_result"):
        app.task(ignore_result="no")(lambda: None)  # type: ignore[arg-type]


async def test_task_id_on_a_backend_that_cannot_claim_is_refused() -> None:
    from aioqueue.backends.memory import MemoryBackend

    class Plain:
        """A custom backend with only the required methods (no claim)."""

        def __init__(self) -> None:
            self._inner = MemoryBackend()
            self.url = "plain://"

        def __getattr__(self, name: str) -> Any:
            if name in {"claim", "end_claim"}:
                raise AttributeError(name)
            return getattr(self._inner, name)

    app = App("plain", broker="memory://", backend=Plain())  # type: ignore[arg-type]

    @app.task
    async def job() -> None:
        return None

    with pytest.raises(ConfigurationError, match="cannot claim task ids"):
        await job.options(task_id="x").send()
    assert await app.broker.queue_length("default") == 0
    await job.send()  # a plain send needs no claim


def test_plain_messages_carry_no_claim_and_settle_as_before() -> None:
    codec = MessageCodec()
    plain = Message(id="p", task="t", queue="q")
    assert b"claim" not in codec.encode(plain) and b"ignore" not in codec.encode(plain)
    store = Store.of(plain, b"x", 5.0)
    assert store == Store("p", b"x", 5.0, None) and store.claim_ttl is None
    claimed = codec.decode(codec.encode(Message(id="c", task="t", queue="q", claim=0.0)))
    assert claimed.claim == 0.0
    assert Store.of(claimed, b"x", 5.0) == Store("c", b"x", 5.0, None, 5.0)
    ignored = Message(id="i", task="t", queue="q", ignore_result=True)
    assert codec.decode(codec.encode(ignored)).ignore_result is True
    assert Store.of(ignored, b"x", 5.0) is None
    ignored_claimed = Message(id="i", task="t", queue="q", ignore_result=True, claim=0.0)
    assert Store.of(ignored_claimed, b"x", 5.0) == Store("i", None, 5.0, None, 0.0)


@pytest.mark.parametrize(
    ("field", "value"), [("claim", "soon"), ("claim", -1), ("claim", True), ("ignore_result", 1)]
)
def test_bad_envelope_fields_are_refused(field: str, value: Any) -> None:
    import orjson

    body = orjson.dumps({"v": 1, "id": "x", "task": "t", "queue": "q", field: value})
    with pytest.raises(ProtocolError, match=field):
        MessageCodec().decode(body)


async def test_a_plain_send_never_claims(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, add, _runs = counting_app(make_app)
    calls: list[str] = []
    async with app:
        backend = await app.ready_backend()
        real = type(backend).claim  # type: ignore[attr-defined]

        async def spy(self: Any, task_id: str, ttl: float, *, fresh: bool) -> bool:
            calls.append(task_id)
            return bool(await real(self, task_id, ttl, fresh=fresh))

        monkeypatch.setattr(type(backend), "claim", spy)
        await add.send(1, 1)
        await add.send_many([(2, 2), add.s(3, 3)])
        await app.send_task(add.name, [4, 4])
        assert calls == []
        await add.options(task_id="one").send(5, 5)
        assert calls == ["one"]


# -- Redis: where the claim lives and how its end is set --------------------------------------


@pytest.fixture
def redis_app(redis_url: str, key_prefix: str, redis_cleanup: None) -> App:
    return App("claims", broker=redis_url, key_prefix=key_prefix, result_ttl=RESULT_TTL)


async def test_redis_claim_ends_with_the_store(
    redis_app: App, raw: aioredis.Redis, key_prefix: str
) -> None:
    app = redis_app

    @app.task
    async def job(x: int) -> int:
        return x

    @app.task(unique_for=20)
    async def windowed(x: int) -> int:
        return x

    async with app:
        kept = await job.options(task_id="kept", result_ttl=100).send(1)
        fired = await job.options(task_id="fired", ignore_result=True).send(2)
        window = await windowed.send(3)
        claim = f"{key_prefix}:claim:"
        # at send: held while the task may wait and run (its result TTL at least)
        assert 99_000 < await raw.pttl(claim + "kept") <= 100_000
        assert await raw.pttl(claim + window.id) > 19_000
        async with running_worker(app):
            assert await kept.get(timeout=10) == 1
            assert await window.get(timeout=10) == 3

            async def released() -> bool:
                return not await raw.exists(claim + fired.id)

            await wait_until(released)  # ignore_result: nothing kept, so the id is free
        assert 99_000 - 5_000 < await raw.pttl(claim + "kept") <= 100_000
        assert 15_000 < await raw.pttl(claim + window.id) <= 20_000
        assert not await raw.exists(f"{key_prefix}:result:{fired.id}")
        await kept.forget()
        assert not await raw.exists(claim + "kept")  # forget() gives the id back


async def test_redis_fenced_settle_ends_the_claim_too(
    redis_app: App, raw: aioredis.Redis, key_prefix: str
) -> None:
    """The settle of a worker whose lease is in doubt is the fenced script: it sets the claim's
    end like the transaction does (and, as for the result, only if the message is still held)."""
    from aioqueue.backends.redis import RedisBackend
    from aioqueue.brokers.redis import RedisBroker
    from aioqueue.message import Outcome

    app = redis_app

    @app.task
    async def job() -> int:
        return 1

    async with app:
        broker, backend = app.broker, app.backend
        assert isinstance(broker, RedisBroker) and isinstance(backend, RedisBackend)
        result = await job.options(task_id="fenced", result_ttl=100).send()
        consumer = broker.consumer(["default"], worker_id="doubt")
        await consumer.start()
        try:
            (delivery,) = await consumer.fetch(1, 0)
            consumer._lease.renewed_at -= 60  # type: ignore[attr-defined]
            assert delivery.lease_in_doubt
            outcome = app.codec.encode_outcome(Outcome("fenced", States.SUCCESS, result=1))
            held = await backend.store_and_ack(
                delivery, "fenced", outcome, ttl=5, reply_to=backend.reply_to(), claim_ttl=5
            )
            assert held
            assert 0 < await raw.pttl(f"{key_prefix}:claim:fenced") <= 5_000
            assert await result.get(timeout=5) == 1
        finally:
            await consumer.close()


async def test_a_claimed_send_needs_the_backend_and_enqueues_nothing_without_it(
    redis_url: str, key_prefix: str, redis_cleanup: None
) -> None:
    from conftest import free_port

    from aioqueue import ResultBackendError

    app = App(
        "no-backend",
        broker=redis_url,
        backend=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        key_prefix=key_prefix,
        broker_connect_timeout=0.5,
    )

    @app.task
    async def job(x: int) -> int:
        return x

    try:
        with pytest.raises(ResultBackendError, match="cannot reach result backend"):
            await job.options(task_id="needs-backend").send(1)
        assert await queued(app) == 0
        await job.send(2)  # a plain send does not touch the backend
        assert await queued(app) == 1
    finally:
        await app.close()


async def test_rpc_claims_need_publisher_confirms(amqp_url: str, key_prefix: str) -> None:
    app = App(
        "no-confirms",
        broker=amqp_url,
        backend="rpc://",
        key_prefix=key_prefix,
        amqp_publisher_confirms=False,
        amqp_delete_queues_on_close=True,
    )

    @app.task
    async def job(x: int) -> int:
        return x

    try:
        with pytest.raises(ConfigurationError, match="publisher confirms"):
            await job.options(task_id="no-confirms").send(1)
        assert await queued(app) == 0
    finally:
        await app.close()


async def test_a_claimed_task_keeps_its_id_through_its_retries(make_app: AppFactory) -> None:
    """A retry is the same task under the same id, re-sent by the worker (not a new send): the
    claim holds while it waits to run again, and ends with its final outcome."""
    app = make_app(result_ttl=RESULT_TTL)
    attempts: list[int] = []
    retrying = asyncio.Event()
    release = asyncio.Event()

    @app.task(retry_for=OSError, max_retries=3, default_retry_delay=0.05)
    async def flaky(x: int) -> int:
        attempts.append(x)
        if len(attempts) == 1:
            retrying.set()
            raise OSError("first try fails")
        await release.wait()
        return x * 10

    async with app, running_worker(app):
        first = await flaky.options(task_id="flaky-1").send(1)
        await asyncio.wait_for(retrying.wait(), 10)
        during = await flaky.options(task_id="flaky-1").send(2)  # between tries: still held
        assert during.id == "flaky-1"
        release.set()
        assert await first.get(timeout=10) == 10
        assert await during.get(timeout=10) == 10
        after = await flaky.options(task_id="flaky-1").send(3)  # its result is kept
        assert await after.get(timeout=10) == 10
    assert attempts == [1, 1]
