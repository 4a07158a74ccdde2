"""Time limits (issue 8, item 5): ``timeout`` (hard) and ``soft_timeout`` on tasks and sends.

Over every transport (conftest.TRANSPORTS). A limit that fires is FAILURE with
TimeLimitExceeded, acked and not dead-lettered; the worker goes on running other tasks.
Nothing waits on a fixed sleep: tasks signal events, and blocked threads are released at the end.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
import uuid
from typing import Any

import pytest
from conftest import AppFactory, running_worker, wait_until

from aioqueue import (
    App,
    AsyncResult,
    ConfigurationError,
    Message,
    ProtocolError,
    SoftTimeLimitExceeded,
    States,
    TimeLimitExceeded,
)
from aioqueue.worker import execution

pytestmark = pytest.mark.timeout(40)

# A limit that fires is reported within this much of it (a loaded 2-core machine, AMQP rpc).
SLACK = 3.0


async def _fails_in_time(result: Any, limit: float, started: float) -> TimeLimitExceeded:
    with pytest.raises(TimeLimitExceeded, match="time limit of") as caught:
        await result.get(timeout=20)
    elapsed = time.monotonic() - started
    assert limit <= elapsed + 0.05 and elapsed < limit + SLACK, elapsed
    return caught.value


async def test_hard_limit_cancels_an_async_task_and_the_worker_goes_on(
    make_app: AppFactory,
) -> None:
    app = make_app()
    cancelled = asyncio.Event()

    @app.task(timeout=0.3)
    async def stuck() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    async with app, running_worker(app):
        started = time.monotonic()
        result = await stuck.send()
        error = await _fails_in_time(result, 0.3, started)
        assert stuck.name in str(error) and "0.3s" in str(error)
        assert cancelled.is_set()
        assert await result.state() == States.FAILURE
        assert await (await add.send(2, 3)).get(timeout=20) == 5
        assert await app.broker.dead_letters("default") == []  # it ran: not bad input


async def test_soft_limit_then_hard_limit(make_app: AppFactory) -> None:
    app = make_app()
    seen: list[str] = []

    @app.task(timeout=0.8, soft_timeout=0.2)
    async def stubborn() -> str:
        try:
            await asyncio.sleep(30)
        except SoftTimeLimitExceeded as exc:
            seen.append(f"soft at {time.monotonic() - started:.2f}: {exc}")
            try:
                await asyncio.sleep(30)  # ignores the warning: the hard limit cancels it
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
        return "never"

    async with app, running_worker(app):
        started = time.monotonic()
        await _fails_in_time(await stubborn.send(), 0.8, started)
        assert len(seen) == 2 and seen[1] == "cancelled", seen
        assert "soft time limit of 0.2s" in seen[0]
        soft_at = float(seen[0].split()[2].rstrip(":"))
        assert soft_at + 0.05 >= 0.2 and soft_at < 0.8, seen


async def test_a_task_that_catches_the_soft_limit_and_returns_succeeds(
    make_app: AppFactory,
) -> None:
    app = make_app()

    @app.task(timeout=10, soft_timeout=0.2)
    async def tidy() -> str:
        try:
            await asyncio.sleep(30)
        except SoftTimeLimitExceeded:
            await asyncio.sleep(0.01)  # clean-up may await: the task is no longer cancelled
            return "cleaned up"
        return "finished"

    @app.task(soft_timeout=0.2)
    async def careless() -> None:
        await asyncio.sleep(30)

    async with app, running_worker(app):
        started = time.monotonic()
        result = await tidy.send()
        assert await result.get(timeout=20) == "cleaned up"
        assert time.monotonic() - started < 0.2 + SLACK
        assert await result.state() == States.SUCCESS
        # not caught: the task fails with it (no hard limit was set)
        with pytest.raises(SoftTimeLimitExceeded, match="soft time limit"):
            await (await careless.send()).get(timeout=20)


async def test_a_thread_task_is_abandoned_and_its_slot_freed(make_app: AppFactory) -> None:
    app = make_app()
    release = threading.Event()
    entered = threading.Event()

    @app.task(timeout=0.3)
    def blocked() -> str:
        entered.set()
        release.wait(20)
        return "too late"

    @app.task
    def quick() -> str:
        return "ran"

    try:
        async with app, running_worker(app, concurrency=1, threads=1) as worker:
            started = time.monotonic()
            await _fails_in_time(await blocked.send(), 0.3, started)
            assert entered.is_set() and not release.is_set()
            # its thread still runs (Python cannot stop it), but its slot is free
            assert worker.abandoned_threads == 1
            assert await (await quick.send()).get(timeout=20) == "ran"
            assert not release.is_set()
            release.set()

            async def returned() -> bool:
                return worker.abandoned_threads == 0

            await wait_until(returned, timeout=10)
    finally:
        release.set()


async def test_a_process_task_child_is_killed_and_the_pool_healed(make_app: AppFactory) -> None:
    import process_tasks

    app = make_app()
    app.import_path = "process_tasks:app"
    nap = app.task(executor="process", timeout=0.5)(process_tasks.nap)
    whoami = app.task(executor="process")(process_tasks.whoami)
    async with app, running_worker(app, processes=1):
        first = await (await whoami.send()).get(timeout=30)
        started = time.monotonic()
        await _fails_in_time(await nap.send(30), 0.5, started)

        def gone() -> bool:
            try:
                with open(f"/proc/{first}/stat") as stat:
                    return stat.read().split(") ")[1].startswith("Z")  # a zombie is dead
            except FileNotFoundError:
                return True

        async def child_gone() -> bool:
            return gone()

        await wait_until(child_gone, timeout=10)
        second = await (await whoami.send()).get(timeout=30)
        assert second != first and second != os.getpid()
        # under its limit, the new child runs it to the end
        assert await (await nap.send(0.01)).get(timeout=30) == 0.01


async def test_send_options_override_the_task_limit(make_app: AppFactory) -> None:
    app = make_app()

    @app.task
    async def nap(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    @app.task(timeout=0.2)
    async def short(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    @app.task
    async def warned(seconds: float) -> str:
        try:
            await asyncio.sleep(seconds)
        except SoftTimeLimitExceeded:
            return "warned"
        return "not warned"

    async with app, running_worker(app):
        started = time.monotonic()
        await _fails_in_time(await nap.options(timeout=0.3).send(30), 0.3, started)
        assert await (await nap.send(0.4)).get(timeout=20) == 0.4  # no limit of its own
        assert await (await short.options(timeout=5).send(0.4)).get(timeout=20) == 0.4
        started = time.monotonic()
        await _fails_in_time(await short.s(30).set(timeout=0.3).send(), 0.3, started)
        started = time.monotonic()
        by_name = await app.send_task(nap.name, [30], timeout=0.3)
        await _fails_in_time(by_name, 0.3, started)
        soft = await warned.options(soft_timeout=0.2, timeout=10).send(30)
        assert await soft.get(timeout=20) == "warned"
        batch = await nap.options(timeout=0.3).send_many([(30,), (0.01,)])
        await _fails_in_time(batch[0], 0.3, started)
        assert await batch[1].get(timeout=20) == 0.01


async def test_a_soft_limit_sent_to_a_thread_task_is_refused_as_bad_input(
    make_app: AppFactory,
) -> None:
    """A sender that does not know the task sets soft_timeout: nothing is silently ignored."""
    app = make_app()

    @app.task
    def plain() -> str:
        return "ran"

    async with app, running_worker(app):
        # as a sender without the task registered would make it (send_task checks a known one)
        message = Message(
            id=uuid.uuid4().hex,
            task=plain.name,
            queue="default",
            reply_to=app.backend.reply_to(),
            sent_at=time.time(),
            soft_timeout=1.0,
        )
        await app.broker.publish("default", app.codec.encode(message))
        result = AsyncResult(message.id, app, token=app.backend.send_token())
        with pytest.raises(ConfigurationError, match="async tasks only"):
            await result.get(timeout=20)
        dead = await app.broker.dead_letters("default")
        assert len(dead) == 1 and "soft_timeout" in dead[0].reason


async def test_apply_obeys_the_limits(make_app: AppFactory) -> None:
    app = make_app()

    @app.task(timeout=0.2)
    async def stuck() -> None:
        await asyncio.sleep(30)

    @app.task(timeout=5, soft_timeout=0.1)
    async def tidy() -> str:
        try:
            await asyncio.sleep(30)
        except SoftTimeLimitExceeded:
            return "tidied"
        return "no"

    with pytest.raises(TimeLimitExceeded):
        await (await stuck.apply()).get()
    assert await (await tidy.apply()).get() == "tidied"


async def test_a_task_without_limits_takes_the_plain_path(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No cost when no limit is set: no timeout scope, no timer, no wrapper."""
    app = make_app()

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a task without limits went through the limited path")

    monkeypatch.setattr(execution, "_call_limited", forbidden)
    async with app, running_worker(app):
        assert await (await add.send(1, 2)).get(timeout=20) == 3


# -- bad values: ConfigurationError naming the value, before any I/O --------------------

BAD_LIMITS = [0, -1, -0.5, math.nan, math.inf, -math.inf, True, "5", 1e12]


def _offline_app() -> App:
    """An app whose broker does not exist: any I/O would fail with a connection error."""
    return App("offline", broker="redis://127.0.0.1:1/0", backend="redis://127.0.0.1:1/0")


@pytest.mark.parametrize("value", BAD_LIMITS, ids=repr)
def test_bad_limits_are_refused_at_registration(value: Any) -> None:
    app = _offline_app()

    async def fn() -> None:
        pass

    with pytest.raises(ConfigurationError, match=r"timeout of .*fn.* not ") as caught:
        app.task(timeout=value)(fn)
    assert repr(value) in str(caught.value)
    with pytest.raises(ConfigurationError, match="soft_timeout of"):
        app.task(soft_timeout=value)(fn)


@pytest.mark.parametrize("value", BAD_LIMITS, ids=repr)
async def test_bad_limits_are_refused_in_send_options(value: Any) -> None:
    app = _offline_app()

    @app.task
    async def fn() -> None:
        pass

    for name in ("timeout", "soft_timeout"):
        with pytest.raises(ConfigurationError, match=f"{name} of send options") as caught:
            fn.options(**{name: value})
        assert repr(value) in str(caught.value)
        with pytest.raises(ConfigurationError, match=name):
            await app.send_task("elsewhere.fn", **{name: value})


async def test_inconsistent_limits_are_refused() -> None:
    app = _offline_app()

    async def fn() -> None:
        pass

    def sync_fn() -> None:
        pass

    with pytest.raises(ConfigurationError, match=r"soft_timeout .*\(2.0\) must be below .*1.0"):
        app.task(timeout=1, soft_timeout=2)(fn)
    with pytest.raises(ConfigurationError, match="must be below"):
        app.task(timeout=1, soft_timeout=1)(fn)
    for executor in ("thread", "process"):
        with pytest.raises(ConfigurationError, match=f"async tasks only: a {executor} task"):
            app.task(soft_timeout=1, executor=executor)(sync_fn)  # type: ignore[call-overload]
    limited = app.task(name="limited", timeout=1.0)(fn)
    with pytest.raises(ConfigurationError, match=r"\(3.0\) must be below its timeout \(1.0\)"):
        limited.options(soft_timeout=3)
    with pytest.raises(ConfigurationError, match="must be below"):
        limited.options(timeout=2, soft_timeout=2)
    with pytest.raises(ConfigurationError, match="must be below"):
        await app.send_task("limited", soft_timeout=3)
    plain = app.task(name="plain")(sync_fn)
    with pytest.raises(ConfigurationError, match="async tasks only"):
        plain.options(soft_timeout=1)
    with pytest.raises(ConfigurationError, match="async tasks only"):
        plain.s().set(soft_timeout=1)
    # a shorter hard limit than the task's soft one is a fine request: the soft one never fires
    both = app.task(name="both", timeout=5, soft_timeout=2)(fn)
    assert both.options(timeout=1)._options.timeout == 1.0
    assert both.options(timeout=1.5, soft_timeout=1)._options.soft_timeout == 1.0


# -- the envelope ------------------------------------------------------------------------


def test_the_envelope_carries_the_limits() -> None:
    app = App("codec", broker="memory://")
    message = Message(id="x", task="t", queue="q", timeout=2.5, soft_timeout=1)
    decoded = app.codec.decode(app.codec.encode(message))
    assert (decoded.timeout, decoded.soft_timeout) == (2.5, 1)
    plain = app.codec.decode(app.codec.encode(Message(id="y", task="t", queue="q")))
    assert (plain.timeout, plain.soft_timeout) == (None, None)
    assert b"timeout" not in app.codec.encode(Message(id="y", task="t", queue="q"))


@pytest.mark.parametrize("field", ["timeout", "soft_timeout"])
@pytest.mark.parametrize("value", [0, -1, True, "5", [], 1e12])
def test_bad_limits_in_an_envelope_are_refused_at_decode(field: str, value: Any) -> None:
    app = App("codec", broker="memory://")
    body = app.codec.encode(Message(id="x", task="t", queue="q"))
    import orjson

    data = orjson.loads(body)
    data[field] = value
    with pytest.raises(ProtocolError, match=f"message field '{field}'"):
        app.codec.decode(orjson.dumps(data))
