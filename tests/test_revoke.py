"""Revoke (issue 9, item 1): ``result.revoke()`` / ``app.control.revoke()``, with terminate.

Over every transport (amqp-rpc keeps revocations in a RabbitMQ stream).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from conftest import AppFactory, PrivateRedis, port_open, running_worker, wait_until

from aioqueue import App, ConfigurationError, Context, States, TaskRevoked

pytestmark = pytest.mark.timeout(60)
READABLE_ELSEWHERE = pytest.mark.parametrize(
    "transport", ["redis", "amqp-redis"]
)  # rpc:// and memory:// results are readable in the sending process only


async def test_a_revoked_delayed_task_never_runs_on_a_worker_started_later(
    make_app: AppFactory,
) -> None:
    app = make_app()
    ran: list[str] = []

    @app.task
    async def job(tag: str) -> str:
        ran.append(tag)
        return tag

    async with app:
        doomed = await job.options(countdown=0.5).send("doomed")
        report = await doomed.revoke()
        assert report and report.revoked and report.state == States.PENDING
        kept = await job.options(countdown=0.5).send("kept")
        async with running_worker(app) as worker:
            assert await kept.get(timeout=20) == "kept"

            async def both_settled() -> bool:
                return worker.processed >= 2

            await wait_until(both_settled, timeout=20)
        with pytest.raises(TaskRevoked, match="revoked"):
            await doomed.get(timeout=5)
        assert await doomed.state() == States.REVOKED
    assert ran == ["kept"]


async def test_revoke_reaches_a_running_worker_by_push(make_app: AppFactory) -> None:
    """The worker is up before the revoke: the push (not the load at start) must stop it."""
    app = make_app()
    ran: list[int] = []

    @app.task
    async def job(n: int) -> int:
        ran.append(n)
        return n

    async with app, running_worker(app) as worker:
        doomed = await job.options(countdown=1.0).send(1)
        await app.control.revoke(doomed.id)
        after = await job.options(countdown=1.0).send(2)
        assert await after.get(timeout=20) == 2

        async def settled() -> bool:
            return worker.processed >= 2

        await wait_until(settled, timeout=20)
        with pytest.raises(TaskRevoked):
            await doomed.get(timeout=5)
    assert ran == [2]


async def test_revoking_a_finished_task_is_a_no_op_that_says_so(make_app: AppFactory) -> None:
    app = make_app()

    @app.task
    async def job() -> str:
        return "done"

    async with app, running_worker(app):
        result = await job.send()
        assert await result.get(timeout=20) == "done"
        report = await result.revoke(terminate=True)
        assert not report and report.state == States.SUCCESS
        assert "already finished" in report.detail
        assert await result.get(timeout=5) == "done"
        unknown = await app.control.revoke("no-such-task-id")
        assert unknown.state == States.PENDING and "no record" in unknown.detail


async def test_revoke_refuses_a_bad_id(make_app: AppFactory) -> None:
    app = make_app()
    with pytest.raises(ConfigurationError, match="task id"):
        await app.control.revoke("")


async def test_terminate_cancels_a_running_async_task(make_app: AppFactory) -> None:
    app = make_app(track_started=True)
    started = asyncio.Event()
    cancelled = asyncio.Event()

    @app.task
    async def stuck() -> str:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "not reached"

    @app.task
    async def ping() -> str:
        return "pong"

    async with app, running_worker(app) as worker:
        result = await stuck.send()
        await asyncio.wait_for(started.wait(), 20)

        async def is_started() -> bool:
            return await result.state() == States.STARTED

        await wait_until(is_started)
        report = await result.revoke(terminate=True)
        assert report and report.state == States.STARTED
        with pytest.raises(TaskRevoked, match="terminated"):
            await result.get(timeout=20)
        assert cancelled.is_set()
        assert await (await ping.send()).get(timeout=20) == "pong"
        assert worker.returned == 0  # acked, not given back for redelivery


async def test_terminate_tells_a_thread_task_and_discards_its_result(
    make_app: AppFactory,
) -> None:
    app = make_app(track_started=True)
    started = threading.Event()
    saw_cancel = threading.Event()

    @app.task(executor="thread", bind=True)
    def loop(ctx: Context) -> str:
        started.set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if ctx.cancelled:
                saw_cancel.set()
                ctx.raise_if_cancelled()
            time.sleep(0.01)
        return "not cancelled"

    async with app, running_worker(app):
        result = await loop.send()
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 20)

        async def is_started() -> bool:
            return await result.state() == States.STARTED

        await wait_until(is_started)
        await app.control.revoke(result.id, terminate=True)
        with pytest.raises(TaskRevoked, match="terminated"):
            await result.get(timeout=20)
        await asyncio.get_running_loop().run_in_executor(None, saw_cancel.wait, 20)
        assert saw_cancel.is_set()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


async def test_terminate_kills_a_process_child_and_spares_the_others(
    make_app: AppFactory,
) -> None:
    import process_tasks

    app = make_app(track_started=True)
    app.import_path = "process_tasks:app"
    nap = app.task(executor="process")(process_tasks.nap)
    whoami = app.task(executor="process")(process_tasks.whoami)
    async with app, running_worker(app, processes=2):
        children = {await (await whoami.send()).get(timeout=30) for _ in range(4)}
        long = await nap.send(30)
        other = await nap.send(1.5)

        async def both_started() -> bool:
            states = {await long.state(), await other.state()}
            return states == {States.STARTED}

        await wait_until(both_started, timeout=20)
        started = time.monotonic()
        await long.revoke(terminate=True)
        with pytest.raises(TaskRevoked, match="terminated"):
            await long.get(timeout=20)
        assert time.monotonic() - started < 10
        assert await other.get(timeout=20) == 1.5  # the other child finished its task

        async def one_child_gone() -> bool:
            return any(_gone(pid) for pid in children)

        await wait_until(one_child_gone, timeout=10)
        after = await (await whoami.send()).get(timeout=30)
        assert after != os.getpid()


async def test_a_revocation_expires_after_revoke_ttl(make_app: AppFactory) -> None:
    app = make_app(revoke_ttl=0.2)

    @app.task
    async def job() -> str:
        return "ran"

    async with app:
        result = await job.options(task_id="reused-id").send()
        await result.revoke()
        await asyncio.sleep(0.3)  # past the TTL on purpose: nothing to wait for otherwise
        seen: list[tuple[list[str], bool, float]] = []
        listening = await app.control.listen(lambda ids, t, at: seen.append((ids, t, at)))
        await listening.aclose()
        assert seen == []


@pytest.mark.parametrize("value", [0, -1, "soon", True])
def test_revoke_ttl_must_be_positive(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="revoke_ttl"):
        App("bad", revoke_ttl=value)


async def test_a_revocation_missed_while_the_control_link_was_down_is_loaded_again(
    private_redis: PrivateRedis,
) -> None:
    """Its push lost (written straight to the kept set, as if published while the worker's
    control connection was down): the worker reads the set again once it has reconnected."""
    url = f"redis://127.0.0.1:{private_redis.port}/0"
    await wait_until(lambda: port_open(private_redis.port))
    app = App("revoke-reconnect", broker=url, backend=url, key_prefix="rr")
    ran: list[str] = []

    @app.task
    async def job(tag: str) -> str:
        ran.append(tag)
        return tag

    raw = aioredis.Redis.from_url(url)
    try:
        async with app, running_worker(app) as worker:

            async def control_subscribers() -> int:
                counts = await raw.pubsub_numsub("rr:control")
                return int(counts[0][1]) if counts else 0

            assert await control_subscribers() == 1
            await raw.client_kill_filter(_type="pubsub")
            await raw.zadd("rr:revoked", {"r:missed": time.time() + 60})

            async def back() -> bool:
                return await control_subscribers() == 1

            await wait_until(back)
            doomed = await job.options(task_id="missed", countdown=1.0).send("doomed")
            kept = await job.options(countdown=1.0).send("kept")
            assert await kept.get(timeout=20) == "kept"

            async def settled() -> bool:
                return worker.processed >= 2

            await wait_until(settled)
            assert ran == ["kept"]
            with pytest.raises(TaskRevoked):
                await doomed.get(timeout=5)
    finally:
        await raw.aclose()


async def test_a_task_that_swallows_the_termination_still_ends_revoked(
    make_app: AppFactory,
) -> None:
    app = make_app(track_started=True)
    started = asyncio.Event()

    @app.task
    async def stubborn() -> str:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            return "swallowed"  # its value is discarded all the same
        return "slept"

    @app.task
    async def ping() -> str:
        return "pong"

    async with app, running_worker(app):
        result = await stubborn.send()
        await asyncio.wait_for(started.wait(), 20)

        async def is_started() -> bool:
            return await result.state() == States.STARTED

        await wait_until(is_started)
        await result.revoke(terminate=True)
        with pytest.raises(TaskRevoked, match="terminated"):
            await result.get(timeout=20)
        assert await (await ping.send()).get(timeout=20) == "pong"


async def test_a_pending_get_learns_of_the_revoke_at_once(make_app: AppFactory) -> None:
    """No worker takes the message for 30 s: the waiter must not have to wait for that.
    (On Redis the sender's get() waits on its reply channel only: the revoke pushes there.)"""
    app = make_app()

    @app.task
    async def job() -> None:
        return None

    async with app:
        result = await job.options(countdown=30).send()
        waiting = asyncio.get_running_loop().create_task(result.get(timeout=20))
        await result.revoke()
        with pytest.raises(TaskRevoked, match="revoked"):
            await asyncio.wait_for(waiting, 10)


@READABLE_ELSEWHERE
async def test_a_get_in_the_sending_process_learns_of_a_revoke_made_elsewhere(
    make_app: AppFactory,
) -> None:
    sender = make_app()
    elsewhere = make_app()

    @sender.task
    async def job() -> None:
        return None

    async with sender, elsewhere:
        result = await job.options(countdown=30).send()
        waiting = asyncio.get_running_loop().create_task(result.get(timeout=20))
        report = await elsewhere.control.revoke(result.id)
        assert report
        with pytest.raises(TaskRevoked, match="revoked"):
            await asyncio.wait_for(waiting, 10)
