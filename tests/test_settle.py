"""The settle path (issue 7): one disposition per delivery, bounded redelivery, parked delays,
outages retried rather than stranded, and oversized bodies refused without being kept whole.

The contract tests run over every transport (conftest.TRANSPORTS).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import pytest
from conftest import AppFactory, running_worker, wait_until

from aioqueue import (
    App,
    ConfigurationError,
    DeliveryLimitExceeded,
    Message,
    MessageTooLarge,
    ResultBackendError,
    SerializationError,
)
from aioqueue.brokers.base import DEAD_LETTER_PREFIX
from aioqueue.worker import handler as handler_module

pytestmark = pytest.mark.timeout(40)


def _raw_message(app: App, task: str, *args: Any, **fields: Any) -> tuple[str, bytes]:
    """An envelope as a sender would make it, with fields senders cannot set yet (eta)."""
    task_id = uuid.uuid4().hex
    message = Message(
        id=task_id,
        task=task,
        queue="default",
        args=args,
        reply_to=app.backend.reply_to(),
        sent_at=time.time(),
        **fields,
    )
    return task_id, app.codec.encode(message)


async def test_a_message_that_keeps_escaping_the_handler_is_dead_lettered(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 4 and 6: an error escaping the handler gives the message back with its attempt
    raised (never stranded); after max_attempts it is dead-lettered as too many deliveries."""
    app = make_app(max_attempts=3)
    calls = 0

    @app.task
    async def fine() -> str:
        return "ran"

    async def broken(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        raise RuntimeError("a bug in the worker")

    monkeypatch.setattr(handler_module, "execute", broken)
    async with app, running_worker(app):
        result = await fine.send()
        with pytest.raises(DeliveryLimitExceeded, match="too many deliveries"):
            await result.get(timeout=20)
        assert calls == 3
        dead = await app.broker.dead_letters("default")
        assert len(dead) == 1 and "too many deliveries" in dead[0].reason


async def test_a_task_can_set_its_own_max_attempts(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app()  # the app allows 5
    calls = 0

    @app.task(max_attempts=2)
    async def fragile() -> str:
        return "ran"

    async def broken(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        raise RuntimeError("a bug in the worker")

    monkeypatch.setattr(handler_module, "execute", broken)
    async with app, running_worker(app):
        with pytest.raises(DeliveryLimitExceeded, match="max_attempts=2"):
            await (await fragile.send()).get(timeout=20)
        assert calls == 2


def test_max_attempts_must_be_a_positive_whole_number() -> None:
    app = App("limits")
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ConfigurationError, match="max_attempts"):

            @app.task(max_attempts=bad)  # type: ignore[arg-type]
            async def job() -> None: ...


async def test_a_future_eta_frees_the_slot_and_runs_when_due(make_app: AppFactory) -> None:
    """Item 10: a message not due yet is parked, not slept on in a slot."""
    app = make_app()
    ran_at: dict[str, float] = {}

    @app.task
    async def stamp(name: str) -> str:
        ran_at[name] = time.time()
        return name

    async with app, running_worker(app, concurrency=1) as worker:
        eta = time.time() + 1.5
        _, body = _raw_message(app, stamp.name, "later", eta=eta)
        await (await app.ready_broker()).publish("default", body)
        await wait_until(lambda: _true(worker.parked == 1))
        # the only slot is free: another task runs while the delayed one waits
        assert await (await stamp.send("now")).get(timeout=5) == "now"
        assert ran_at["now"] < eta
        await wait_until(lambda: _true("later" in ran_at), timeout=10)
        assert ran_at["later"] >= eta
        # due while the idle worker's fetch held its only slot: the fetch gave way at once
        assert ran_at["later"] - eta < 1.0
        assert worker.parked == 0


async def test_an_expired_message_is_not_run(make_app: AppFactory) -> None:
    app = make_app()
    ran: list[int] = []

    @app.task
    async def job() -> None:
        ran.append(1)

    async with app, running_worker(app) as worker:
        _, body = _raw_message(app, job.name, expires=time.time() - 1)
        await (await app.ready_broker()).publish("default", body)
        await wait_until(lambda: _true(worker.processed == 1))
        assert ran == []


async def test_parked_messages_go_back_untouched_at_shutdown(make_app: AppFactory) -> None:
    app = make_app()

    @app.task
    async def job() -> str:
        return "ok"

    async with app:
        broker = await app.ready_broker()
        async with running_worker(app) as worker:
            _, body = _raw_message(app, job.name, eta=time.time() + 60)
            await broker.publish("default", body)
            await wait_until(lambda: _true(worker.parked == 1))
        assert worker.returned == 1
        consumer = broker.consumer(["default"], worker_id="inspector")
        await consumer.start()
        try:
            (delivery,) = await _fetch_one(consumer)
            assert delivery.attempt == 1  # it never ran: no attempt counted
            await delivery.ack()
        finally:
            await consumer.close()


async def test_oversized_body_is_refused_and_only_its_prefix_kept(make_app: AppFactory) -> None:
    """Item 16: refused by length, FAILURE recorded, dead letter keeps size and a prefix."""
    app = make_app(max_message_size=64 * 1024)

    @app.task
    async def echo(text: str) -> str:
        return text

    async with app, running_worker(app):
        sender = App("big-sender", broker=app.conf.broker_url)  # a sender without the limit
        task_id, body = _raw_message(sender, echo.name, "x" * (1024 * 1024))
        assert len(body) > 1024 * 1024
        await (await app.ready_broker()).publish("default", body)
        if getattr(app.backend, "persistent", True):
            with pytest.raises(MessageTooLarge):
                await app.AsyncResult(task_id).get(timeout=10)

        async def buried() -> bool:
            return bool(await app.broker.dead_letters("default"))

        await wait_until(buried)
        (dead,) = await app.broker.dead_letters("default")
        assert dead.size == len(body)
        assert len(dead.body) <= DEAD_LETTER_PREFIX and body.startswith(dead.body)
        assert "MessageTooLarge" in dead.reason
        assert await (await echo.send("small")).get(timeout=10) == "small"


async def test_unserializable_result_is_logged_with_its_real_error(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 17: the log line names the SerializationError, not 'None: None'."""
    app = make_app()

    @app.task
    async def odd() -> object:
        return object()

    caplog.set_level(logging.ERROR, "aioqueue.worker")
    async with app, running_worker(app):
        with pytest.raises(SerializationError):
            await (await odd.send()).get(timeout=10)
    failed = [r.getMessage() for r in caplog.records if "failed in" in r.getMessage()]
    assert failed and "SerializationError" in failed[0] and "None: None" not in failed[0]


async def test_a_failed_task_logs_its_traceback_at_debug_level(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()

    @app.task
    async def boom() -> None:
        raise ValueError("deep down")

    caplog.set_level(logging.DEBUG, "aioqueue.worker")
    async with app, running_worker(app):
        with pytest.raises(ValueError):
            await (await boom.send()).get(timeout=10)
    failed = [r.getMessage() for r in caplog.records if "failed in" in r.getMessage()]
    assert failed and "Traceback" in failed[0] and 'raise ValueError("deep down")' in failed[0]


async def test_store_failures_are_retried_until_the_backend_takes_the_outcome(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items 4 and 14: a backend refusing stores for a while delays the settle; the message is
    neither acked without its outcome nor stranded, and the result arrives afterwards."""
    app = make_app()

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    async with app:
        backend = await app.ready_backend()
        failures = 0
        store = type(backend).store
        joint = getattr(type(backend), "store_and_ack", None)

        async def flaky_store(self: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal failures
            if failures < 4:  # about 0.75 s of back-off
                failures += 1
                raise ResultBackendError("backend away (test)")
            return await store(self, *args, **kwargs)

        async def flaky_joint(self: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal failures
            if failures < 4:
                failures += 1
                raise ResultBackendError("backend away (test)")
            return await joint(self, *args, **kwargs)  # type: ignore[misc]

        monkeypatch.setattr(type(backend), "store", flaky_store)
        if joint is not None:
            monkeypatch.setattr(type(backend), "store_and_ack", flaky_joint)
        async with running_worker(app) as worker:
            result = await add.send(20, 22)
            assert await result.get(timeout=20) == 42
            assert failures == 4
            await wait_until(lambda: _true(worker.processed == 1))
            assert await app.broker.queue_length("default") == 0


# -- helpers ------------------------------------------------------------------------------


async def _true(value: bool) -> bool:
    return value


async def _fetch_one(consumer: Any) -> list[Any]:
    deadline = asyncio.get_running_loop().time() + 10
    while asyncio.get_running_loop().time() < deadline:
        got = await consumer.fetch(1, 1.0)
        if got:
            return list(got)
    raise AssertionError("nothing to fetch within 10s")


async def test_a_parked_message_that_expires_while_waiting_for_a_slot_is_not_run(
    make_app: AppFactory,
) -> None:
    """Its eta came, but the only slot was busy until after its expiry: REVOKED, never run."""
    from aioqueue import TaskRevoked

    app = make_app()
    ran: list[str] = []
    release = asyncio.Event()

    @app.task
    async def hold() -> str:
        await release.wait()
        return "held"

    @app.task
    async def stamp(name: str) -> str:
        ran.append(name)
        return name

    async with app, running_worker(app, concurrency=1):
        now = time.time()
        late = await stamp.options(countdown=1.0, expires=1.8).send("late")
        holder = await hold.send()  # takes the only slot before the eta comes
        await asyncio.sleep(max(0.0, now + 2.2 - time.time()))  # past the expiry
        release.set()
        assert await holder.get(timeout=10) == "held"
        with pytest.raises(TaskRevoked):
            await late.get(timeout=10)
        assert ran == []
