"""The sync client: ``send_sync`` and ``SyncResult`` from plain threads, on every transport."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import REDIS_URL, AppFactory, require_server, running_worker

from aioqueue import App, ConfigurationError, ResultIgnored, ResultTimeout, States
from aioqueue.sync import SyncCallInEventLoop, SyncResult, sync_client


class Boom(Exception):
    pass


def build(app: App) -> dict[str, Any]:
    @app.task(name="sync.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="sync.fail")
    async def fail() -> None:
        raise Boom("no")

    return {"add": add, "fail": fail}


@contextlib.contextmanager
def worker_on_client_loop(app: App) -> Iterator[None]:
    """A worker on the sync client's own loop thread (so memory:// is shared with the sends)."""
    client = sync_client(app)
    worker = client.app.worker(concurrency=10, processes=1)
    running = asyncio.run_coroutine_threadsafe(worker.run(), client.loop)
    asyncio.run_coroutine_threadsafe(worker.ready.wait(), client.loop).result(20)
    try:
        yield
    finally:
        client.loop.call_soon_threadsafe(worker.stop)
        running.result(20)


@pytest.fixture
def closing() -> Iterator[list[App]]:
    """Apps whose sync client is closed after the test (before make_app closes them again)."""
    apps: list[App] = []
    yield apps
    for app in apps:
        sync_client(app).close()


def test_send_sync_round_trip(make_app: AppFactory, closing: list[App]) -> None:
    app = make_app()
    closing.append(app)
    tasks = build(app)
    with worker_on_client_loop(app):
        result = tasks["add"].send_sync(2, 3)
        assert isinstance(result, SyncResult)
        assert result.get(timeout=10) == 5
        assert result.state() == States.SUCCESS
        assert result.ready() and result.successful() and not result.failed()
        assert result.info() == 5
        assert not result.revoke()  # finished: nothing to revoke, as the async handle says

        failed = tasks["fail"].send_sync()
        with pytest.raises(Boom, match="no"):
            failed.get(timeout=10)
        assert failed.state() == States.FAILURE
        assert isinstance(failed.info(), Boom)

        by_name = app.send_task_sync("sync.add", (4, 5))
        assert by_name.get(timeout=10) == 9
        by_id = app.SyncResult(by_name.id)  # a handle from the id alone, as a Flask view has it
        assert isinstance(by_id, SyncResult) and by_id == by_name
        assert by_id.get(timeout=10) == 9 and by_id.state() == States.SUCCESS

        many = tasks["add"].send_many_sync([(1, 1), (2, 2), tasks["add"].s(3, 3)])
        assert [r.get(timeout=10) for r in many] == [2, 4, 6]

        delayed = tasks["add"].options(countdown=0.2, result_ttl=60).send_sync(1, 2)
        assert delayed.get(timeout=10) == 3


def test_get_times_out_and_ignored_results_raise(make_app: AppFactory, closing: list[App]) -> None:
    app = make_app()
    closing.append(app)
    tasks = build(app)
    result = tasks["add"].send_sync(1, 2)  # no worker: nothing will come
    with pytest.raises(ResultTimeout):
        result.get(timeout=0.2)
    assert result.state() == States.PENDING
    ignored = tasks["add"].options(ignore_result=True).send_sync(1, 2)
    with pytest.raises(ResultIgnored):
        ignored.get(timeout=1)
    assert result.revoke()  # still waiting in its queue: recorded


def test_bad_options_fail_before_sending(make_app: AppFactory, closing: list[App]) -> None:
    app = make_app()
    closing.append(app)
    tasks = build(app)
    with pytest.raises(ConfigurationError, match="countdown"):
        tasks["add"].options(countdown=-1).send_sync(1, 2)
    with pytest.raises(ConfigurationError, match="bogus"):
        app.send_task_sync("sync.add", (1, 2), bogus=1)


def test_many_threads_share_one_loop(make_app: AppFactory, closing: list[App]) -> None:
    app = make_app()
    closing.append(app)
    tasks = build(app)
    errors: list[BaseException] = []
    got: list[int] = []
    lock = threading.Lock()

    def client(base: int) -> None:
        try:
            results = [tasks["add"].send_sync(base, i) for i in range(20)]
            values = [r.get(timeout=20) for r in results]
            with lock:
                got.extend(values)
        except BaseException as exc:
            errors.append(exc)

    with worker_on_client_loop(app):
        threads = [threading.Thread(target=client, args=(1000 * n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert not errors
    assert sorted(got) == sorted(1000 * n + i for n in range(8) for i in range(20))
    loops = [t for t in threading.enumerate() if t.name == f"aioqueue-sync-{app.name}"]
    assert len(loops) == 1


def test_a_closed_client_is_replaced_not_reused() -> None:
    """A send after close() used to wait forever on the stopped loop."""
    app = App("reopened", broker="memory://")
    tasks = build(app)
    first = sync_client(app)
    first.close()
    assert tasks["add"].send_sync(1, 1).id
    assert sync_client(app) is not first
    sync_client(app).close()


async def test_sync_sends_from_threads_while_the_app_serves_a_loop(
    make_app: AppFactory, closing: list[App]
) -> None:
    """A web app connected in its lifespan, a sync view run on a thread: the sync client must
    not use the loop's connections from its own loop (they are bound to the loop that opened
    them); the async side keeps working after."""
    app = make_app()
    closing.append(app)
    tasks = build(app)

    def sync_view(n: int) -> int:
        return tasks["add"].send_sync(n, n).get(timeout=30)

    async with app, running_worker(app):
        assert await (await tasks["add"].send(1, 2)).get(timeout=10) == 3
        # memory://: a worker on this loop and a waiter on the client's loop are woken across
        # threads (before, each side saw the other only when its own timeout expired)
        got = await asyncio.wait_for(asyncio.to_thread(sync_view, 21), 15)
        assert got == 42
        assert await (await tasks["add"].send(5, 6)).get(timeout=10) == 11


def test_a_fork_that_skipped_the_at_fork_hook_is_noticed_by_pid() -> None:
    """uwsgi and other C-level forks may not run Python's at-fork hooks: a client made in
    another process is not used (its loop thread is not in this one)."""
    app, bystander = App("pid-check", broker="memory://"), App("other", broker="memory://")
    tasks = build(app)
    kept = sync_client(bystander)
    first = sync_client(app)
    first.pid = -1  # as if made by the parent of this process
    try:
        assert tasks["add"].send_sync(1, 1).id
        assert sync_client(app) is not first
        # only the stale client is dropped: another app's live one keeps its connections (it
        # was dropped too, and its open sockets were left to the garbage collector)
        assert sync_client(bystander) is kept and kept.alive
    finally:
        first.close()
        sync_client(app).close()
        kept.close()


async def test_refused_inside_an_event_loop() -> None:
    app = App("in-loop", broker="memory://")
    tasks = build(app)
    with pytest.raises(SyncCallInEventLoop, match=r"await task\.send"):
        tasks["add"].send_sync(1, 2)
    with pytest.raises(SyncCallInEventLoop):
        app.send_task_sync("sync.add", (1, 2))
    with pytest.raises(SyncCallInEventLoop):
        app.SyncResult("some-id")
    assert await tasks["add"].send(1, 2)  # the async form works; nothing was left pending


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads running
def test_forked_child_builds_its_own_loop_and_connections(
    key_prefix: str, redis_cleanup: None
) -> None:
    """gunicorn's pre-fork model: the parent sent before forking; the child sends on its own
    connections, and the parent's keep working after the child exits."""
    require_server(REDIS_URL, "Redis")
    app = App("forked", broker=REDIS_URL, backend=REDIS_URL, key_prefix=key_prefix)
    tasks = build(app)
    try:
        with worker_on_client_loop(app):
            assert tasks["add"].send_sync(1, 1).get(timeout=10) == 2
            parent_loop = sync_client(app).loop
            pid = os.fork()
            if pid == 0:  # the child: report through the exit code only
                code = 1
                try:
                    if sync_client(app).loop is not parent_loop:
                        code = 2 if tasks["add"].send_sync(20, 22).get(timeout=10) == 42 else 3
                finally:
                    os._exit(0 if code == 2 else code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert tasks["add"].send_sync(2, 2).get(timeout=10) == 4
    finally:
        sync_client(app).close()
