"""Progress (issue 9, item 2): ``ctx.update_state`` from every executor, ``result.watch()``.

Over every transport: over rpc:// in the sending process, elsewhere from any process.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from conftest import REDIS_URL, AppFactory, running_worker, wait_until

from aioqueue import App, AsyncResult, Context, Outcome, States, StateUpdate, TaskRevoked

pytestmark = pytest.mark.timeout(60)
READABLE_ELSEWHERE = pytest.mark.parametrize(
    "transport", ["redis", "amqp-redis"]
)  # rpc:// and memory:// results are readable in the sending process only


async def _collect(result: AsyncResult[Any], into: list[StateUpdate]) -> None:
    async for update in result.watch():
        into.append(update)


async def _watching(app: App, result: AsyncResult[Any], task: asyncio.Task[None]) -> None:
    """Returns once the watch in ``task`` is subscribed (no state can be missed from then on)."""
    if app.conf.result_backend and app.conf.result_backend.startswith("redis"):
        client = aioredis.Redis.from_url(REDIS_URL)
        channel = f"{app.conf.key_prefix}:watch:{result.id}"
        try:

            async def subscribed() -> bool:
                counts = await client.pubsub_numsub(channel)
                return bool(counts and counts[0][1] >= 1)

            await wait_until(subscribed)
        finally:
            await client.aclose()
    else:
        # memory and rpc:// register the watcher in the generator's first step, with no I/O
        for _ in range(3):
            await asyncio.sleep(0)
    assert not task.done()


async def test_watch_sees_every_state_of_a_task_reporting_from_a_process_child(
    make_app: AppFactory, tmp_path: Path
) -> None:
    import process_tasks

    app = make_app(track_started=True)
    app.import_path = "process_tasks:app"
    report = app.task(executor="process", bind=True)(process_tasks.report_progress)
    go = tmp_path / "go"
    async with app:
        result = await report.send(3, str(go))
        updates: list[StateUpdate] = []
        watcher = asyncio.get_running_loop().create_task(_collect(result, updates))
        await _watching(app, result, watcher)
        async with running_worker(app, processes=1):

            async def first_progress() -> bool:
                return any(u.state == "PROGRESS" for u in updates)

            await wait_until(first_progress, timeout=30)
            assert await result.state() == "PROGRESS"
            assert await result.info() == {"done": 0}
            go.touch()
            await asyncio.wait_for(watcher, 30)
            assert await result.get(timeout=5) == 3
    seen = [(u.state, u.meta) for u in updates]
    assert seen == [
        (States.RECEIVED, None),
        (States.STARTED, None),
        ("PROGRESS", {"done": 0}),
        ("PROGRESS", {"done": 1}),
        ("PROGRESS", {"done": 2}),
        ("PROGRESS", {"done": 3}),
        (States.SUCCESS, 3),
    ]
    assert updates[-1].ready and updates[-1].outcome.result == 3
    assert not any(u.ready for u in updates[:-1])


async def test_watch_started_late_gets_the_current_state_then_the_rest(
    make_app: AppFactory,
) -> None:
    app = make_app()
    step = asyncio.Event()
    reported = asyncio.Event()

    @app.task(bind=True)
    async def stepper(ctx: Context) -> str:
        await ctx.update_state("PROGRESS", {"done": 1})
        reported.set()
        await step.wait()
        await ctx.update_state("PROGRESS", {"done": 2})
        return "end"

    async with app, running_worker(app):
        result = await stepper.send()
        await asyncio.wait_for(reported.wait(), 20)
        updates: list[StateUpdate] = []
        watcher = asyncio.get_running_loop().create_task(_collect(result, updates))

        async def has_current() -> bool:
            return len(updates) >= 1

        await wait_until(has_current, timeout=20)
        step.set()
        await asyncio.wait_for(watcher, 20)
    assert [(u.state, u.meta) for u in updates] == [
        ("PROGRESS", {"done": 1}),
        ("PROGRESS", {"done": 2}),
        (States.SUCCESS, "end"),
    ]


async def test_watch_of_a_finished_task_yields_its_outcome_once(make_app: AppFactory) -> None:
    app = make_app()

    @app.task
    async def boom() -> None:
        raise ValueError("no")

    async with app, running_worker(app):
        result = await boom.send()
        with pytest.raises(ValueError):
            await result.get(timeout=20)
        updates = [u async for u in result.watch()]
    assert len(updates) == 1 and updates[0].state == States.FAILURE
    assert isinstance(updates[0].meta, ValueError)


async def test_progress_from_a_thread_task_is_watched(make_app: AppFactory) -> None:
    app = make_app()
    go = threading.Event()

    @app.task(executor="thread", bind=True)
    def counter(ctx: Context) -> int:
        ctx.update_state_blocking("PROGRESS", {"done": 0})
        go.wait(20)
        ctx.update_state_blocking("PROGRESS", {"done": 1})
        return 1

    async with app, running_worker(app):
        result = await counter.send()
        updates: list[StateUpdate] = []
        watcher = asyncio.get_running_loop().create_task(_collect(result, updates))

        async def started() -> bool:
            return len(updates) >= 1

        await wait_until(started, timeout=20)
        go.set()
        await asyncio.wait_for(watcher, 20)
    assert [(u.state, u.meta) for u in updates] == [
        ("PROGRESS", {"done": 0}),
        ("PROGRESS", {"done": 1}),
        (States.SUCCESS, 1),
    ]


async def test_watch_ends_with_revoked(make_app: AppFactory) -> None:
    app = make_app()

    @app.task
    async def job() -> None:
        return None

    async with app:
        result = await job.options(countdown=30).send()
        updates: list[StateUpdate] = []
        watcher = asyncio.get_running_loop().create_task(_collect(result, updates))
        await _watching(app, result, watcher)
        await result.revoke()
        await asyncio.wait_for(watcher, 20)
    assert [u.state for u in updates] == [States.REVOKED]
    assert isinstance(updates[0].meta, TaskRevoked)


@READABLE_ELSEWHERE
async def test_watch_from_another_process_app(make_app: AppFactory) -> None:
    """A second App (as another process would be) watches a task the first one sent."""
    sender = make_app()
    watcher_app = make_app()
    step = asyncio.Event()

    @sender.task(bind=True)
    async def slow(ctx: Context) -> str:
        await ctx.update_state("PROGRESS", {"done": 1})
        await step.wait()
        return "ok"

    async with sender, watcher_app, running_worker(sender):
        result = await slow.send()
        handle = watcher_app.AsyncResult(result.id)
        updates: list[StateUpdate] = []
        watcher = asyncio.get_running_loop().create_task(_collect(handle, updates))

        async def has_one() -> bool:
            return len(updates) >= 1

        await wait_until(has_one, timeout=20)
        step.set()
        await asyncio.wait_for(watcher, 20)
    assert [u.state for u in updates] == ["PROGRESS", States.SUCCESS]


async def test_redis_watch_loses_nothing_stored_between_subscribing_and_reading(
    redis_url: str, key_prefix: str, redis_cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """States stored after the subscription is confirmed but before the first read arrive as
    pushes *and* in the read: each is yielded once, in order, then the later ones."""
    from aioqueue.backends.redis import RedisBackend

    app = App("watch-race", broker="memory://", backend=redis_url, key_prefix=key_prefix)
    backend = app.backend
    assert isinstance(backend, RedisBackend)
    codec = app.codec

    def state(done: int) -> bytes:
        return codec.encode_outcome(Outcome("t1", "PROGRESS", {"done": done}))

    original = RedisBackend._subscribe_and_read

    async def racing(self: RedisBackend, pubsub: Any, *args: Any) -> Any:
        real_get = pubsub.get_message
        confirmations = 0

        async def get_message(**kwargs: Any) -> Any:
            nonlocal confirmations
            message = await real_get(**kwargs)
            if message is not None and message["type"] == "subscribe":
                confirmations += 1
                if confirmations == 2:  # subscribed to both, not read yet
                    await self.store_state("t1", state(1), ttl=60)
                    await self.store_state("t1", state(2), ttl=60)
            return message

        pubsub.get_message = get_message
        return await original(self, pubsub, *args)

    monkeypatch.setattr(RedisBackend, "_subscribe_and_read", racing)
    async with app:
        await backend.store_state("t1", state(0), ttl=60)  # before the watch: not seen
        updates: list[StateUpdate] = []
        watcher = asyncio.get_running_loop().create_task(_collect(app.AsyncResult("t1"), updates))

        async def two() -> bool:
            return len(updates) >= 2

        await wait_until(two)
        await backend.store_state("t1", state(3), ttl=60)
        final = codec.encode_outcome(Outcome("t1", States.SUCCESS, "ok", date_done=1.0))
        await backend.store("t1", final, ttl=60, reply_to=None)
        await asyncio.wait_for(watcher, 10)
    assert [(u.state, u.meta) for u in updates] == [
        ("PROGRESS", {"done": 1}),
        ("PROGRESS", {"done": 2}),
        ("PROGRESS", {"done": 3}),
        (States.SUCCESS, "ok"),
    ]


async def test_a_state_the_worker_cannot_store_does_not_fail_the_process_task(
    tmp_path: Path,
) -> None:
    """A state is advice: the child goes on and the task's own outcome is what counts."""
    from aioqueue import ResultBackendError
    from aioqueue.worker.executors import ProcessPool

    go = tmp_path / "go"
    go.touch()
    forwarded: list[Any] = []

    async def on_state(state: str, meta: Any) -> None:
        forwarded.append((state, meta))
        raise ResultBackendError("the result backend is away")

    context = {"id": "t1", "name": "process_tasks.report_progress", "queue": "default"}
    pool = ProcessPool("process_tasks:app", 1, max_tasks_per_child=None, serializer="json")
    try:
        name = "process_tasks.report_progress"
        assert await pool.run(name, (2, str(go)), {}, None, context, on_state) == 2
    finally:
        await pool.aclose()
    assert forwarded == [("PROGRESS", {"done": n}) for n in range(3)]
