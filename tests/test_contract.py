"""The contract: the same behaviour on every transport and backend (see conftest.TRANSPORTS)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from typing import Any

import pytest
from conftest import AppFactory, running_worker, wait_until

from aioqueue import (
    App,
    InvalidArguments,
    MessageTooLarge,
    RemoteError,
    ResultTimeout,
    SerializationError,
    States,
    TaskNotRegistered,
)

pytestmark = pytest.mark.timeout(30)


class CustomError(Exception):
    """Importable here, so a client that has this module rebuilds it with its own type."""


def register_basics(app: App) -> dict[str, Any]:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(executor="thread")
    def blocking_upper(word: str) -> str:
        return f"{word.upper()}:{threading.current_thread() is not threading.main_thread()}"

    @app.task
    async def raise_value_error(text: str) -> None:
        raise ValueError(text)

    @app.task
    async def raise_custom() -> None:
        raise CustomError("custom", 42)

    @app.task
    async def raise_local_type() -> None:
        class LocalOnlyError(Exception):
            pass

        raise LocalOnlyError("cannot be rebuilt elsewhere")

    @app.task
    async def unserializable() -> object:
        return object()

    return {
        "add": add,
        "upper": blocking_upper,
        "value_error": raise_value_error,
        "custom": raise_custom,
        "local": raise_local_type,
        "unserializable": unserializable,
    }


async def test_async_task_result(make_app: AppFactory) -> None:
    app = make_app()
    tasks = register_basics(app)
    async with app, running_worker(app):
        result = await tasks["add"].send(2, 3)
        assert await result.get(timeout=10) == 5
        assert await result.state() == States.SUCCESS
        assert await result.ready()
        assert await result.successful()


async def test_thread_task_runs_off_the_loop(make_app: AppFactory) -> None:
    app = make_app()
    tasks = register_basics(app)
    async with app, running_worker(app):
        result = await tasks["upper"].send("hi")
        assert await result.get(timeout=10) == "HI:True"


async def test_thread_task_sees_copied_contextvars(make_app: AppFactory) -> None:
    app = make_app()
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")
    seen: list[str] = []

    @app.task(executor="thread")
    def read_context() -> str:
        seen.append(request_id.get())
        return request_id.get()

    async with app:
        request_id.set("set-in-worker-loop")
        async with running_worker(app):
            result = await read_context.send()
            assert await result.get(timeout=10) == "set-in-worker-loop"


async def test_failure_reraises_builtin_type_with_traceback(make_app: AppFactory) -> None:
    app = make_app()
    tasks = register_basics(app)
    async with app, running_worker(app):
        result = await tasks["value_error"].send("bad value")
        with pytest.raises(ValueError, match="bad value"):
            await result.get(timeout=10)
        assert await result.state() == States.FAILURE
        traceback = await result.traceback()
        assert traceback is not None and "raise ValueError(text)" in traceback
        info = await result.info()
        assert isinstance(info, ValueError)


async def test_failure_of_importable_custom_type(make_app: AppFactory) -> None:
    app = make_app()
    tasks = register_basics(app)
    async with app, running_worker(app):
        result = await tasks["custom"].send()
        with pytest.raises(CustomError) as caught:
            await result.get(timeout=10)
        assert caught.value.args == ("custom", 42)


async def test_failure_of_unimportable_type_is_remote_error(make_app: AppFactory) -> None:
    app = make_app()
    tasks = register_basics(app)
    async with app, running_worker(app):
        result = await tasks["local"].send()
        with pytest.raises(RemoteError) as caught:
            await result.get(timeout=10)
        assert "LocalOnlyError" in caught.value.exc_type
        assert caught.value.message == "cannot be rebuilt elsewhere"
        assert caught.value.remote_traceback and "LocalOnlyError" in caught.value.remote_traceback
        returned = await result.get(timeout=10, propagate=False)
        assert isinstance(returned, RemoteError)


async def test_unknown_task_is_failure_and_dead_letter(make_app: AppFactory) -> None:
    app = make_app()
    tasks = register_basics(app)
    async with app, running_worker(app):
        result = await app.send_task("no.such.task", [1, 2])
        with pytest.raises(TaskNotRegistered, match=r"no\.such\.task"):
            await result.get(timeout=10)
        dead = await app.broker.dead_letters("default")
        assert len(dead) == 1
        assert b"no.such.task" in dead[0].body
        assert "TaskNotRegistered" in dead[0].reason
        # the worker is still running
        assert await (await tasks["add"].send(1, 1)).get(timeout=10) == 2


async def test_undecodable_body_goes_to_dead_letters(make_app: AppFactory) -> None:
    app = make_app()
    tasks = register_basics(app)
    async with app, running_worker(app):
        broker = await app.ready_broker()
        await broker.publish("default", b"\xff\xfenot json at all")
        await broker.publish("default", b'{"v": 99, "id": "v99", "task": "x", "queue": "default"}')

        async def two_dead() -> bool:
            return len(await broker.dead_letters("default")) == 2

        await wait_until(two_dead)
        # two slots refuse them at once: the dead letters' order is the order they were refused
        dead = {letter.body: letter for letter in await broker.dead_letters("default")}
        assert b"\xff\xfenot json at all" in dead
        assert "not valid JSON" in dead[b"\xff\xfenot json at all"].reason
        v99 = b'{"v": 99, "id": "v99", "task": "x", "queue": "default"}'
        assert "unknown envelope version 99" in dead[v99].reason
        # the v99 message carried an id: its FAILURE is recorded under it (where the backend
        # keeps results that a fresh handle can read; rpc:// only pushes them to a reply_to)
        if getattr(app.backend, "persistent", True):
            with pytest.raises(Exception, match="unknown envelope version"):
                await app.AsyncResult("v99").get(timeout=10)
        assert await (await tasks["add"].send(2, 2)).get(timeout=10) == 4


async def test_wrong_arguments_fail_clearly_and_are_kept(make_app: AppFactory) -> None:
    app = make_app()
    tasks = register_basics(app)
    async with app, running_worker(app):
        result = await app.send_task(tasks["add"].name, [1, 2, 3])
        with pytest.raises(InvalidArguments, match=r"arguments do not fit .*add\(x: int, y: int\)"):
            await result.get(timeout=10)
        dead = await app.broker.dead_letters("default")
        assert len(dead) == 1 and "arguments do not fit" in dead[0].reason


async def test_unserializable_result_is_failure_and_kept(make_app: AppFactory) -> None:
    app = make_app()
    tasks = register_basics(app)
    async with app, running_worker(app):
        result = await tasks["unserializable"].send()
        with pytest.raises(SerializationError, match="cannot be serialized"):
            await result.get(timeout=10)
        dead = await app.broker.dead_letters("default")
        assert len(dead) == 1 and "cannot be serialized" in dead[0].reason


async def test_send_many_in_one_call(make_app: AppFactory) -> None:
    app = make_app()
    tasks = register_basics(app)
    add = tasks["add"]
    async with app, running_worker(app):
        results = await add.send_many([(i, i) for i in range(50)] + [add.s(100, 1)])
        values = await asyncio.gather(*(r.get(timeout=10) for r in results))
        assert values == [2 * i for i in range(50)] + [101]


async def test_options_route_to_queue_and_set_id(make_app: AppFactory) -> None:
    app = make_app()
    tasks = register_basics(app)
    async with app:
        result = await tasks["add"].options(queue="high", task_id="my-id-1").send(4, 5)
        assert result.id == "my-id-1"
        assert await app.broker.queue_length("high") == 1
        async with running_worker(app, queues=["high"]):
            assert await result.get(timeout=10) == 9


async def test_result_stored_before_wait_is_not_missed(make_app: AppFactory) -> None:
    app = make_app()
    tasks = register_basics(app)
    async with app:
        result = await tasks["add"].send(20, 22)
        async with running_worker(app):
            await wait_until(result.ready)
        # a fresh handle, as another request in the same service would build from the id
        assert await app.AsyncResult(result.id).get(timeout=10) == 42
        assert await result.get(timeout=10) == 42
        assert await result.get(timeout=10) == 42  # twice: the push is not consumed


async def test_get_times_out_without_a_worker(make_app: AppFactory) -> None:
    app = make_app()
    tasks = register_basics(app)
    async with app:
        result = await tasks["add"].send(1, 2)
        assert await result.state() == States.PENDING
        with pytest.raises(ResultTimeout):
            await result.get(timeout=0.2)
        with pytest.raises(TimeoutError):  # also a TimeoutError, for generic handlers
            await result.get(timeout=0.05)


async def test_track_started_shows_received_and_started(make_app: AppFactory) -> None:
    app = make_app(track_started=True)
    release = asyncio.Event()

    @app.task
    async def held() -> str:
        await release.wait()
        return "done"

    async with app, running_worker(app):
        result = await held.send()

        async def started() -> bool:
            return await result.state() == States.STARTED

        await wait_until(started)
        release.set()
        assert await result.get(timeout=10) == "done"
        assert await result.state() == States.SUCCESS


async def test_prefetch_never_exceeds_free_slots(make_app: AppFactory) -> None:
    app = make_app()
    release = asyncio.Event()
    running = 0
    peak = 0

    @app.task
    async def hold() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1

    async with app:
        results = await hold.send_many([() for _ in range(10)])
        async with running_worker(app, concurrency=3):

            async def three_running() -> bool:
                return running == 3

            await wait_until(three_running)
            # the other seven are still in the queue, free for any other worker
            assert await app.broker.queue_length("default") == 7
            release.set()
            await asyncio.gather(*(r.get(timeout=10) for r in results))
    assert peak == 3


async def test_burst_worker_exits_when_queue_is_empty(make_app: AppFactory) -> None:
    app = make_app()
    tasks = register_basics(app)
    async with app:
        results = await tasks["add"].send_many([(i, 1) for i in range(20)])
        worker = app.worker(concurrency=5, burst=True)
        await asyncio.wait_for(worker.run(), 15)
        assert worker.processed == 20
        assert [await r.get(timeout=5) for r in results] == [i + 1 for i in range(20)]


async def test_graceful_stop_finishes_running_tasks(make_app: AppFactory) -> None:
    app = make_app()
    started = asyncio.Event()

    @app.task
    async def slow() -> str:
        started.set()
        await asyncio.sleep(0.3)
        return "finished"

    async with app:
        result = await slow.send()
        worker = app.worker(concurrency=2, shutdown_timeout=10)
        run = asyncio.create_task(worker.run())
        await started.wait()
        worker.stop()
        await asyncio.wait_for(run, 10)
        assert await result.get(timeout=5) == "finished"


async def test_stop_after_grace_returns_task_to_queue(make_app: AppFactory) -> None:
    app = make_app()
    started = asyncio.Event()
    attempts: list[int] = []

    @app.task
    async def stubborn() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            started.set()
            await asyncio.sleep(3600)
        return "second time lucky"

    async with app:
        result = await stubborn.send()
        worker = app.worker(concurrency=2, shutdown_timeout=0.1)
        run = asyncio.create_task(worker.run())
        await started.wait()
        worker.stop()
        await asyncio.wait_for(run, 10)
        assert await app.broker.queue_length("default") == 1
        async with running_worker(app):
            assert await result.get(timeout=10) == "second time lucky"
    assert len(attempts) == 2


async def test_result_ttl_expires(make_app: AppFactory) -> None:
    app = make_app(result_ttl=0.3)
    tasks = register_basics(app)
    async with app, running_worker(app):
        result = await tasks["add"].send(1, 1)
        assert await result.get(timeout=10) == 2

        async def expired() -> bool:
            return await app.AsyncResult(result.id).state() == States.PENDING

        await wait_until(expired, timeout=5)


async def test_message_size_limit_checked_at_send(make_app: AppFactory) -> None:
    app = make_app(max_message_size=1024)
    tasks = register_basics(app)
    async with app:
        with pytest.raises(MessageTooLarge, match="max_message_size=1024"):
            await tasks["upper"].send("x" * 2000)


async def test_pickle_is_refused_unless_accepted(make_app: AppFactory) -> None:
    app = make_app(serializer="pickle", accept_content=["json"])
    tasks = register_basics(app)
    async with app, running_worker(app):
        result = await tasks["add"].send(1, 2)
        with pytest.raises(Exception, match="content type 'pickle' is not accepted"):
            await result.get(timeout=10)
        dead = await app.broker.dead_letters("default")
        assert len(dead) == 1


async def test_pickle_works_when_opted_in(make_app: AppFactory) -> None:
    app = make_app(
        serializer="pickle", accept_content=["json", "pickle"], signing_key="s3cret-signing-key"
    )

    @app.task
    async def make_set(n: int) -> set[int]:
        return set(range(n))

    async with app, running_worker(app):
        result = await make_set.send(3)
        assert await result.get(timeout=10) == {0, 1, 2}


async def test_many_concurrent_waiters(make_app: AppFactory) -> None:
    app = make_app()
    tasks = register_basics(app)
    async with app, running_worker(app, concurrency=50):

        async def one(i: int) -> int:
            result = await tasks["add"].send(i, 1)
            value: int = await result.get(timeout=20)
            return value

        values = await asyncio.gather(*(one(i) for i in range(300)))
        assert values == [i + 1 for i in range(300)]


async def test_process_tasks(make_app: AppFactory, tmp_path: Any) -> None:
    import os

    import process_tasks

    app = make_app()
    app.import_path = "process_tasks:app"
    square = app.task(executor="process")(process_tasks.square)
    whoami = app.task(executor="process")(process_tasks.whoami)
    fail = app.task(executor="process")(process_tasks.fail)
    noisy = app.task(executor="process")(process_tasks.print_and_return)
    async with app, running_worker(app, processes=2):
        assert await (await square.send(7)).get(timeout=20) == 49
        pid = await (await whoami.send()).get(timeout=20)
        assert pid != os.getpid()
        with pytest.raises(ValueError, match="from a child"):
            await (await fail.send("from a child")).get(timeout=20)
        assert await (await noisy.send("clean")).get(timeout=20) == "clean"


async def test_envelope_eta_and_expiry_are_obeyed(make_app: AppFactory) -> None:
    import time

    from aioqueue import AsyncResult, Message, TaskExpired

    app = make_app()
    tasks = register_basics(app)
    add = tasks["add"]
    async with app, running_worker(app):
        broker = await app.ready_broker()
        now = time.time()
        # addressed like App.send addresses messages, so rpc:// pushes the results back here
        reply_to, token = app.backend.reply_to(), app.backend.send_token()
        expired = Message(
            id="old",
            task=add.name,
            queue="default",
            args=(1, 1),
            expires=now - 1,
            reply_to=reply_to,
        )
        later = Message(
            id="later",
            task=add.name,
            queue="default",
            args=(2, 2),
            eta=now + 0.3,
            reply_to=reply_to,
        )
        await broker.publish("default", app.codec.encode(expired))
        await broker.publish("default", app.codec.encode(later))
        with pytest.raises(TaskExpired, match="expired"):
            await AsyncResult("old", app, token=token).get(timeout=10)
        assert await AsyncResult("later", app, token=token).get(timeout=10) == 4
        assert time.time() >= now + 0.3
        assert await broker.dead_letters("default") == []
